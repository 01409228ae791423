"""Fake (meta) kernels of the fused_wd operators, so torch.compile and
FakeTensor tracing can reason about them, plus the thin device-aware glue the
optimizers share."""
import torch

from fused_wd import _ext

if _ext.C is not None:

    @torch.library.register_fake("fused_wd::multi_tensor_norm")
    def _norm_fake(tensors, norm_type):
        torch._check(len(tensors) > 0, lambda: "multi_tensor_norm needs at least one tensor")
        return tensors[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fused_wd::clip_")
    def _clip_fake(tensors, total_norm, max_norm):
        return None

    @torch.library.register_fake("fused_wd::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                   lr_tensor, beta1, beta2, eps, weight_decay, decay_mode, initial_lr, amsgrad,
                   maximize, grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite,
                   master_params, stochastic_rounding=False, sr_seed=0, sr_ids=()):
        return None

    @torch.library.register_fake("fused_wd::sgd_")
    def _sgd_fake(params, grads, momentum_buffers, buffer_is_new, lr, lr_tensor, momentum,
                  dampening, nesterov, weight_decay, decay_mode, initial_lr, maximize, grad_norm,
                  max_norm, grad_scale, found_inf, skip_nonfinite, master_params,
                  state_steps, stochastic_rounding=False, sr_seed=0, sr_ids=()):
        return None


def multi_tensor_norm(tensors, norm_type=2.0):
    """Global norm of tensors on any devices, as a float32 0-dim tensor on
    the first tensor's device. One kernel per device; no host sync."""
    _ext.require()
    by_device = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    norms = [torch.ops.fused_wd.multi_tensor_norm(ts, float(norm_type)) for ts in by_device.values()]
    if len(norms) == 1:
        return norms[0]
    first = norms[0].device
    stacked = torch.stack([n.to(first, non_blocking=True) for n in norms])
    return torch.linalg.vector_norm(stacked, ord=float(norm_type))
