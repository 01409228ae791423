"""python -m fused_wd info: the version, torch, the compiled backends, the CPU
and the CPU kernels' choices for it."""
import sys


def info():
    import torch

    import fused_wd
    from fused_wd import _cpu, _ext

    print(f"fused_wd {fused_wd.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"GPU visible: {torch.cuda.is_available()}")
    if _ext.C is None:
        print(f"extension: NOT LOADED\n{_ext.load_error}")
        return 1
    print(f"extension built against torch {_ext.C.torch_version}")
    print(f"backends compiled: {', '.join(_ext.backends())}")
    cpu = _cpu.identity()
    print(f"CPU: {_cpu.describe(cpu)}, {cpu['vendor']}, extensions: {' '.join(cpu['isa_flags']) or 'none'}")
    print(f"CPU kernels: {_ext.C.cpu_isa()} ({torch.get_num_threads()} threads)")
    t = _ext.cpu_tuning()
    print(f"CPU tuning: prefetch {t['prefetch_blocks']} blocks ahead, locality {t['locality']} ({t['reason']})")
    if _ext.load_error:
        print(_ext.load_error)
    return 0


def main(argv):
    if argv[:1] in ([], ["info"]):
        return info()
    print("usage: python -m fused_wd info\n       python -m fused_wd.bench --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
