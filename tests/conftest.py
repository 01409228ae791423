import pytest
import torch

import fused_wd  # noqa: F401

CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]

# The one tolerance table of the suite (CPU and CUDA tests alike), for
# comparing with torch.optim / the reference after several steps: a few units
# of the dtype's rounding, tight enough that a wrong formula (a missing bias
# correction, decay in the wrong place, an unclipped gradient) fails by orders
# of magnitude in fp32/fp64; fp16/bf16 are also checked tightly against
# fused_wd.reference, which rounds like the kernels (tol_for below).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    # fp16/bf16 against torch's fused path: one rounding of the storage at a
    # magnitude of 1 (an ulp lost early persists as an absolute error). With
    # clipping, torch.nn.utils.clip_grad_norm_ rounds the clipped fp16/bf16
    # grads to their dtype while fused_wd clips in fp32 inside the kernel:
    # half an ulp of a gradient, which Adam's normalization keeps below an ulp
    # of the param (for fp16 see FP16_CLIPPED_ADAM_EPS below).
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

# The documented variants of TOL (see tol_for):
# - fp64 clipped with a global norm computed differently on the two sides
#   (torch's fp64 norm, or a norm that sums fp32 tensors in fp32): the norm
#   and the clip factor are float32 values by contract (multi_tensor_norm,
#   clip_coef), so the clipped grads agree to about 1.2e-7 relative. Where an
#   L2-decayed grad cancels (clip * g close to -wd * p) Adam's first steps
#   divide that difference by eps, up to lr * |clip * g| * 1.2e-7 / eps per
#   step: the worst seen is 6e-8 (5 steps, lr 0.01, eps 1e-6, clipped grads
#   below 0.05), hence atol 2e-7, five orders below a wrong formula's error;
FP64_CLIPPED = dict(rtol=1e-6, atol=2e-7)
# - fp16/bf16 against fused_wd.reference: the same fp32 math and one rounding
#   to storage, so one ulp apart at most.
LOWP_VS_REFERENCE = {dt: dict(rtol=torch.finfo(dt).eps, atol=1e-5) for dt in (torch.float16, torch.bfloat16)}
# - fp64 CUDA against the CPU kernels where a per-tensor double scalar may
#   differ in its last bit (pow() of glibc and of CUDA, see test_cuda.py):
#   a few fp64 ulps instead of the bits.
FP64_LAST_BITS = dict(rtol=1e-15, atol=1e-15)


# Not a tolerance but the one comparison that needs another setting: fp16
# Adam against torch with clipping. torch.nn.utils.clip_grad_norm_ stores the
# clipped grads in fp16 (small ones as subnormals) while fused_wd clips in
# fp32 inside the kernel, so exp_avg may differ in its last bit. Where
# exp_avg_sq underflows fp16 to 0 (a clipped grad below about 8e-4), Adam's
# step is lr * exp_avg / eps: with eps = 1e-6 that one bit moves the param by
# about 3e-3, more than any fp16 tolerance that still catches a wrong formula.
# These comparisons use eps = 1e-3, which keeps it below 1e-5.
FP16_CLIPPED_ADAM_EPS = 1e-3


def tol_for(dtype, clipped=False, reference=False):
    """TOL[dtype], or its variant: `clipped` when the two sides clip fp64
    grads with norms computed in different ways, `reference` when one side is
    fused_wd.reference."""
    if clipped and dtype == torch.float64:
        return FP64_CLIPPED
    if reference and dtype in LOWP_VS_REFERENCE:
        return LOWP_VS_REFERENCE[dtype]
    return TOL[dtype]


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
               decay_mode=0, cautious_wd=False, initial_lr=1.0, amsgrad=False, maximize=False,
               grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
               stochastic_rounding=False, sr_seed=0)
    assert set(kw) <= set(out), set(kw) - set(out)
    out.update(kw)
    return out


def sgd_hyper(**kw):
    """Every keyword-only argument of torch.ops.fused_wd.sgd_, with
    defaults, overridden by kw."""
    out = dict(lr=0.01, lr_tensor=None, momentum=0.0, dampening=0.0, nesterov=False,
               weight_decay=0.0, decay_mode=0, cautious_wd=False, initial_lr=1.0, maximize=False,
               grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
               stochastic_rounding=False, sr_seed=0)
    assert set(kw) <= set(out), set(kw) - set(out)
    out.update(kw)
    return out
