"""fused_wd: the optimizer step as one memory-bound pass.

Global gradient-norm clipping, weight decay (L2, decoupled, independent,
corrected, cautious, L1, proximal L1) and the Adam, AdamW and SGD updates,
fused in CPU and CUDA kernels, behind
drop-in replacements for torch.optim.
"""
from fused_wd import _ext
from fused_wd import _ops  # noqa: F401  (fake kernels)
from fused_wd._ops import multi_tensor_norm
from fused_wd.clip import clip_grad_norm_
from fused_wd.optim import SGD, Adam, AdamW
from fused_wd.param_groups import param_groups_for_decay
from fused_wd import reference

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "clip_grad_norm_",
    "multi_tensor_norm",
    "param_groups_for_decay",
    "reference",
    "backends",
    "cpu_tuning",
    "set_cpu_tuning",
    "__version__",
]

backends = _ext.backends
cpu_tuning = _ext.cpu_tuning
set_cpu_tuning = _ext.set_cpu_tuning
