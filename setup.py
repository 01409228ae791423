"""Build fused_wd._C: the CPU kernels always, the CUDA kernels when the
installed torch is a CUDA build and a CUDA toolkit is found.

FUSED_WD_CUDA=1 forces the CUDA build (and fails if it cannot happen),
FUSED_WD_CUDA=0 skips it. FUSED_WD_SANITIZE=1 builds the CPU code with
AddressSanitizer and UndefinedBehaviorSanitizer (see scripts/sanitize.sh).

The module uses only the stable (limited) Python C API: one build, one wheel
tagged abi3, serves every Python that its torch supports.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest CPython whose stable ABI the module targets: the one torch's
# build_ext defines for limited-API extensions (3.9 where it defines none).
LIMITED_API = getattr(cpp_extension, "min_supported_cpython", "0x03090000")
ABI_TAG = f"cp3{int(LIMITED_API, 16) >> 16 & 0xFF}"


def want_cuda():
    flag = os.environ.get("FUSED_WD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FUSED_WD_CUDA must be 0 or 1, got {flag!r}")
    home = cpp_extension.CUDA_HOME
    found = (torch.version.cuda is not None and home is not None
             and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")))
    if flag == "1" and not found:
        raise SystemExit(
            "FUSED_WD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} is {'a CUDA' if torch.version.cuda else 'a CPU-only'} build "
            f"and CUDA_HOME is {home!r} (set CUDA_HOME to the toolkit folder)"
        )
    return found if flag == "" else flag == "1"


def pip_cuda_includes():
    """Headers torch's CUDA build needs (cusparse.h, ...) that a bare toolkit
    may lack: they ship in the nvidia/* pip packages next to torch."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def extension():
    with_cuda = want_cuda()
    # an in-place build from before abi3 would shadow the new _C.abi3.so
    for stale in glob.glob(os.path.join(ROOT, "fused_wd", "_C.cpython-*.so")):
        print(f"fused_wd: removing {stale}, a build without the stable ABI")
        os.remove(stale)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's builds.
    # No errno or FP-exception state to keep: sqrt and the branch-free
    # conversions vectorize. fp-contract off: the same bits on every ISA.
    cxx = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-fopenmp",
           "-fno-math-errno", "-fno-trapping-math", f"-DPy_LIMITED_API={LIMITED_API}",
           f'-DFUSED_WD_TORCH_VERSION="{torch.__version__}"']
    ldflags = ["-fopenmp"]
    if os.environ.get("FUSED_WD_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx[0] = "-O1"
        cxx += san + ["-g", "-fno-omit-frame-pointer"]
        ldflags += san
    args = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DFUSED_WD_WITH_CUDA")
        args["nvcc"] = ["-O3", "--fmad=false", "-DFUSED_WD_WITH_CUDA", f"-DPy_LIMITED_API={LIMITED_API}",
                        f'-DFUSED_WD_TORCH_VERSION="{torch.__version__}"']
        cls = cpp_extension.CUDAExtension
        include_dirs += pip_cuda_includes()
    print(f"fused_wd: building CPU kernels{' and CUDA kernels' if with_cuda else ''}"
          f" (torch {torch.__version__}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return cls(
        name="fused_wd._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=args,
        extra_link_args=ldflags,
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    options={"bdist_wheel": {"py_limited_api": ABI_TAG}},
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
