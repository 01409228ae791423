"""fused_wd.clip_grad_norm_: torch.nn.utils.clip_grad_norm_ on the fused_wd
kernels (one norm kernel and one scaling kernel per device, no host sync)."""
import math

import torch

from fused_wd import _clip_guard, _ext
from fused_wd import distributed as _dist
from fused_wd._ops import group_by_device, multi_tensor_norm
from fused_wd.optim import _local_real, _real


def _counted_norm(entries, norm_type):
    """The norm of the entries this rank counts (None: it counts none)."""
    counted = [t for t in entries if t is not None]
    return multi_tensor_norm(counted, norm_type) if counted else None


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Clips the gradients of `parameters` in place so that their global norm
    is at most `max_norm`, and returns the pre-clip global norm (a float32
    0-dim tensor). Same arguments and result as torch.nn.utils.clip_grad_norm_;
    norm types other than 2 and inf are handed to torch's implementation."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    _clip_guard.check(parameters, max_norm, "fused_wd.clip_grad_norm_")
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("fused_wd.clip_grad_norm_ does not support sparse gradients")
    if _dist.refresh() and _dist.any_dtensor(grads):
        # DTensor grads (FSDP2): one local pass, one all-reduce, local scaling
        total = _dist.global_norm(grads, norm_type, _counted_norm, _real)
        grads = [_local_real(g) for g in grads]
    else:
        grads = [_real(g) for g in grads]
        total = multi_tensor_norm(grads, norm_type)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`")
    _ext.require()
    for device, gs in group_by_device(grads).items():
        torch.ops.fused_wd.clip_(gs, total.to(device, non_blocking=True), float(max_norm))
    return total
