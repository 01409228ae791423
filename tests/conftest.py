import pytest
import torch

import fused_wd  # noqa: F401

CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]

# Tolerances for comparing with torch.optim / the reference after several
# steps: a few units of the dtype's rounding, tight enough that a wrong
# formula (a missing bias correction, decay in the wrong place, an unclipped
# gradient) fails by orders of magnitude in fp32/fp64; fp16/bf16 are also
# checked tightly against fused_wd.reference, which rounds like the kernels.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    # fp16/bf16 against torch's fused path: one rounding of the storage at a
    # magnitude of 1 (an ulp lost early persists as an absolute error).
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

SHAPES = [(37, 19), (5,), (), (0,), (3, 4, 5)]


def make_params(dtype, device, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]


def make_grads(params, step, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [(scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype).to(p.device)
            for p in params]


def clone_leaves(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def adam_hyper(**kw):
    """Every keyword-only argument of torch.ops.fused_wd.adam_, with
    defaults, overridden by kw."""
    out = dict(lr=0.01, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               decay_mode=0, initial_lr=1.0, amsgrad=False, maximize=False, grad_norm=None,
               max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
               stochastic_rounding=False, sr_seed=0)
    assert set(kw) <= set(out), set(kw) - set(out)
    out.update(kw)
    return out


def sgd_hyper(**kw):
    """Every keyword-only argument of torch.ops.fused_wd.sgd_, with
    defaults, overridden by kw."""
    out = dict(lr=0.01, lr_tensor=None, momentum=0.0, dampening=0.0, nesterov=False,
               weight_decay=0.0, decay_mode=0, initial_lr=1.0, maximize=False, grad_norm=None,
               max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
               stochastic_rounding=False, sr_seed=0)
    assert set(kw) <= set(out), set(kw) - set(out)
    out.update(kw)
    return out
