"""python -m fused_wd.bench"""
import sys

from fused_wd.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
