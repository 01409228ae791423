"""Loading of the compiled extension, with an actionable message when it is
missing or was built against another torch."""
import os
import warnings

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rebuild_command():
    if os.path.exists(os.path.join(_ROOT, "setup.py")):
        return f"cd {_ROOT} && pip install --no-build-isolation -e ."
    return "pip install --no-build-isolation --force-reinstall --no-deps fused_wd"


C = None
load_error = None

try:
    from fused_wd import _C as C  # noqa: N812  (registers the fused_wd ops)
except ImportError as e:
    load_error = (
        f"fused_wd: the compiled extension fused_wd._C could not be loaded ({e}). "
        f"It is missing, or was built against another torch than the installed {torch.__version__}. "
        f"Rebuild it with: {rebuild_command()}"
    )
    warnings.warn(load_error, RuntimeWarning, stacklevel=2)
else:
    if C.torch_version != torch.__version__:
        load_error = (
            f"fused_wd: the compiled extension was built against torch {C.torch_version} "
            f"but torch {torch.__version__} is installed; its kernels may misbehave. "
            f"Rebuild it with: {rebuild_command()}"
        )
        warnings.warn(load_error, RuntimeWarning, stacklevel=2)


def require():
    """Raises a clear error when the kernels are not available."""
    if C is None:
        raise RuntimeError(load_error)


def backends():
    """The backends whose kernels are compiled in: ['cpu'] or ['cpu', 'cuda']."""
    if C is None:
        return []
    return ["cpu", "cuda"] if C.with_cuda else ["cpu"]


def cpu_tuning():
    """The CPU kernels' tuning in force: {"prefetch_blocks", "locality",
    "reason"} (docs/design.md, "CPU tuning"). Chosen by a rule per CPU at
    first use; FUSED_WD_CPU_PREFETCH forces one ("off", "<blocks>" or
    "<blocks>:<locality>"). No choice changes a bit of any result."""
    require()
    blocks, locality, reason = C.cpu_tuning()
    return {"prefetch_blocks": blocks, "locality": locality, "reason": reason}


def set_cpu_tuning(prefetch_blocks, locality=3):
    """Forces the CPU kernels' tuning in this process (for A/B runs): each
    block of the update loops prefetches the block `prefetch_blocks` blocks
    ahead (0: none) with __builtin_prefetch locality `locality` (0-3)."""
    require()
    C.set_cpu_tuning(int(prefetch_blocks), int(locality))
