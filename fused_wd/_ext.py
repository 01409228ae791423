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
