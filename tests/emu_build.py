"""Builds and loads the host build of the CUDA kernels (csrc/emu/emu_ops.cpp):
the fused_wd_emu operators, which run csrc/cuda's own code on CPU tensors.

Compiled with the CPU kernels' floating-point flags (no FMA contraction, IEEE
division and sqrt), so that its element math rounds like theirs. With
FUSED_WD_SANITIZE=1 it is built with AddressSanitizer and
UndefinedBehaviorSanitizer (scripts/sanitize.sh)."""
import hashlib
import os

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "csrc", "emu", "emu_ops.cpp"), os.path.join(ROOT, "csrc", "common.cpp")]

FLAGS = ["-O2", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden",
         "-DFUSED_WD_ISA=emulated"]
# The kernels' argument room: 4096 bytes (CUDA before 12.1), so that a few
# dozen tensors fill a table and the tests' calls span several launches.
# benchmarks/cuda_host_cost.py asks for CUDA 12.1's 32764, the real tables.
ARG_BYTES = 4096
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def load(arg_bytes=ARG_BYTES):
    """Builds (or reuses) the emulation library and returns torch.ops.fused_wd_emu
    (one build per process: a second call returns the first one's ops)."""
    cflags, ldflags = FLAGS + [f"-DFUSED_WD_MAX_ARG_BYTES={arg_bytes}"], ["-pthread"]
    if os.environ.get("FUSED_WD_SANITIZE") == "1":
        cflags = ["-O1", "-g"] + cflags[1:] + SANITIZE
        ldflags += SANITIZE
    tag = hashlib.sha1(" ".join(cflags + [torch.__version__]).encode()).hexdigest()[:10]
    build = os.path.join(ROOT, "build", f"emu-{tag}")
    os.makedirs(build, exist_ok=True)
    # Under scripts/sanitize.sh this process runs with the sanitizer runtimes
    # preloaded; the compiler it starts must not be.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        cpp_extension.load(
            name="fused_wd_emu", sources=SOURCES, extra_include_paths=[os.path.join(ROOT, "csrc")],
            extra_cflags=cflags, extra_ldflags=ldflags, build_directory=build, is_python_module=False,
            verbose=os.environ.get("FUSED_WD_EMU_VERBOSE") == "1")
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return torch.ops.fused_wd_emu

