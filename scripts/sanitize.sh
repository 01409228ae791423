#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer in
# a copy of the tree and runs the CPU test suite against that build, and the
# emulated CUDA tests against a sanitized host build of the CUDA kernels.
# Usage: scripts/sanitize.sh [pytest args...]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$src" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
FUSED_WD_SANITIZE=1 FUSED_WD_CUDA=0 MAX_JOBS=2 python setup.py -q build_ext --inplace >build.log 2>&1 \
  || { tail -30 build.log; exit 1; }
# Python itself is not built with ASan: preload the runtime, ignore its leaks.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$work" FUSED_WD_SANITIZE=1
python -c "import fused_wd; assert fused_wd.__file__.startswith('$work'), fused_wd.__file__"
workers=()  # pytest-xdist, where installed: one process per core, at most 4
python -c "import xdist" 2>/dev/null && workers=(-n auto --maxprocesses 4)
# Not under the sanitizers (they run unsanitized in the main suite): the four
# emulated tests that launch the emulator once per tensor for a spread of
# tensors, or hundreds of tensors at once (over a third of the emulated
# suite's time, several minutes under ASan); the multi-table, chunked and
# empty-tensor paths stay covered by test_*_many_tensors_* and
# test_norm_many_tensors_and_chunks.
slow="do_not_depend_on_the_call or many_tensors_and_empty_params"
python -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_parity.py tests/test_features.py tests/test_inputs.py \
  tests/test_cuda_emulated.py -k "not compile and not instruction_sets and not ($slow)" "$@"
echo "sanitized CPU and emulated CUDA test suites: clean"
