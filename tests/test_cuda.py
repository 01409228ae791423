"""CUDA backend of fused_wd: parity with torch.optim on the GPU, bit-for-bit
agreement with the CPU kernels, the multi-tensor apply edge cases (thousands
of tensors, misaligned views, a tensor past 2^31 elements), determinism, no
host sync, CUDA graph capture, GradScaler, mixed dtypes, several GPUs, and
opcheck. Every element must be within the suite's one tolerance table
(conftest.TOL and its documented variants, conftest.tol_for). Every test is
skipped when no CUDA device is present."""
import copy
import math

import pytest
import torch

import fused_wd
from conftest import (FP16_CLIPPED_ADAM_EPS, FP64_LAST_BITS, TOL, adam_hyper, make_grads, make_params,
                      sgd_hyper, tol_for)

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")

DEV = "cuda"
ops = torch.ops.fused_wd

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# a 0-dim param, an empty one, one crossing a chunk boundary (16384)
SHAPES = [(37, 19), (5,), (), (0,), (3, 4, 5), (16385,)]
NONE_GRAD = {1: (1, 3)}  # param 1 has no grad on steps 1 and 3
CLIPS = [None, (0.5, 2.0), (0.05, math.inf)]


def host_params(dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def host_grads(shapes, step, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * seed + step + 1)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def leaves(ps, device=DEV):
    return [p.detach().clone().to(device).requires_grad_(True) for p in ps]


def clip_kwargs(clip):
    return {} if clip is None else dict(max_grad_norm=clip[0], norm_type=clip[1])


def assert_same(a, b, oa, ob, tol):
    """Params of a and b, and every state tensor of oa and ob, agree: every
    element within tol."""
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(y.detach(), x.detach(), **tol, msg=lambda m, i=i: f"param {i}: {m}")
    for x, y in zip(a, b):
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k, va in sa.items():
            vb = sb[k]
            if va is None:
                assert vb is None, k
                continue
            assert vb.shape == va.shape and vb.dtype == va.dtype, (k, vb.shape, va.shape, vb.dtype, va.dtype)
            torch.testing.assert_close(vb.cpu(), va.cpu(), **tol, msg=lambda m, k=k: f"state {k}: {m}")


def run_pair(make_a, make_b, dtype, clip=None, steps=5, shapes=SHAPES, clip_a=True):
    """Runs optimizer a (clipped by torch.nn.utils.clip_grad_norm_ first when
    clip is set and clip_a) and optimizer b side by side."""
    base = host_params(dtype, shapes)
    a, b = leaves(base), leaves(base)
    oa, ob = make_a(a), make_b(b)
    for s in range(steps):
        gs = host_grads(shapes, s, dtype=dtype)
        for i, (x, y, g) in enumerate(zip(a, b, gs)):
            none = s in NONE_GRAD.get(i, ())
            x.grad = None if none else g.to(DEV, copy=True)
            y.grad = None if none else g.to(DEV, copy=True)
        if clip is not None and clip_a:
            # (torch refuses the inf norm of an empty tensor; it adds nothing)
            torch.nn.utils.clip_grad_norm_([p for p in a if p.numel()], clip[0], clip[1])
        oa.step()
        ob.step()
    return a, b, oa, ob


def torch_impls(dtype):
    # torch's for-loop path computes fp16/bf16 in the storage dtype; its fused
    # path computes in fp32 like fused_wd.
    if dtype in (torch.float32, torch.float64):
        return ["foreach=False", "fused=True"]
    return ["fused=True"]


def impl_kwargs(impl):
    return dict(foreach=False) if impl == "foreach=False" else dict(fused=True)


def test_cuda_backend_is_built():
    assert "cuda" in fused_wd.backends(), "fused_wd._C was built without its CUDA kernels"
    for name in ("multi_tensor_norm", "clip_", "adam_", "sgd_"):
        op = getattr(ops, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name


# ------------------------------------------------------------------ parity


ADAM_KINDS = {
    "Adam": (torch.optim.Adam, fused_wd.Adam, {}),
    "AdamW": (torch.optim.AdamW, fused_wd.AdamW, {}),
    "Adam-decoupled": (torch.optim.Adam, fused_wd.Adam, dict(decoupled_weight_decay=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip2", "clipinf"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kind", list(ADAM_KINDS))
def test_adam_parity_with_torch(kind, weight_decay, maximize, amsgrad, clip, dtype):
    tcls, fcls, extra = ADAM_KINDS[kind]
    eps = FP16_CLIPPED_ADAM_EPS if dtype == torch.float16 and clip is not None else 1e-6
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize, **extra)
    for impl in torch_impls(dtype):
        a, b, oa, ob = run_pair(lambda p: tcls(p, **hp, **impl_kwargs(impl)),
                                lambda p: fcls(p, **hp, **clip_kwargs(clip)), dtype, clip)
        assert_same(a, b, oa, ob, tol_for(dtype, clip is not None))


SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.9, nesterov=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip2", "clipinf"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("case", SGD_CASES, ids=["plain", "momentum", "dampening", "nesterov"])
def test_sgd_parity_with_torch(case, weight_decay, maximize, clip, dtype):
    hp = dict(lr=0.01, weight_decay=weight_decay, maximize=maximize, **case)
    for impl in torch_impls(dtype):
        a, b, oa, ob = run_pair(lambda p: torch.optim.SGD(p, **hp, **impl_kwargs(impl)),
                                lambda p: fused_wd.SGD(p, **hp, **clip_kwargs(clip)), dtype, clip)
        assert_same(a, b, oa, ob, tol_for(dtype, clip is not None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["l2", "decoupled", "independent", "corrected", "cautious",
                                  "cautious-corrected", "l1", "l1_proximal"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_weight_decay_modes_match_reference(name, mode, dtype):
    fcls = getattr(fused_wd, name)
    rcls = getattr(fused_wd.reference, name)
    cautious = mode.startswith("cautious")
    mode = {"cautious": "decoupled", "cautious-corrected": "corrected"}.get(mode, mode)
    hp = dict(lr=0.01, weight_decay=0.1, weight_decay_mode=mode, max_grad_norm=0.5,
              cautious_weight_decay=cautious)
    if name == "SGD":
        hp["momentum"] = 0.9
    a, b, oa, ob = run_pair(lambda p: rcls(p, **hp), lambda p: fcls(p, **hp), dtype, clip_a=False)
    assert_same(a, b, oa, ob, tol_for(dtype, reference=True))
    torch.testing.assert_close(ob.last_grad_norm, oa.last_grad_norm, rtol=1e-6, atol=0)


# ------------------------------------------- bit for bit with the CPU kernels
#
# The same adam_/sgd_ calls, on the same inputs and with the same grad_norm
# tensor, on the GPU and on the CPU. Both backends compute every element with
# csrc/fused_wd/math.h in opmath (fp32 for fp16/bf16/fp32 storage, fp64 for
# fp64), with FMA contraction off (-ffp-contract=off, nvcc --fmad=false), IEEE
# division and sqrt, and one round-to-nearest-even to storage: the bits of
# every param, master, state and step counter must agree. The global norm is
# fed in, not compared: the backends sum squares in different orders.
#
# One place where bits may differ: make_adam_scalars evaluates the bias
# corrections with pow() in double, glibc's on the host and CUDA's libdevice
# on the GPU (documented to 2 ulp). A last-bit difference of a double
# vanishes when it is rounded to float, so fp32/fp16/bf16 stay bitwise, but
# fp64 uses the double as it is: with betas whose powers are exact (0.5,
# 0.75) fp64 is bitwise too; with 0.9/0.999 it is held to a few fp64 ulps.

# tails, a 0-dim and an empty tensor, several chunks, and more tensors than
# one launch's table holds (Adam's table has room for 48)
BITWISE_SHAPES = [(1000,), (17, 3), (), (0,), (16384 * 2 + 5,), (4097,)] + [(n,) for n in range(1, 60)]
MISALIGNED = (1, 5)  # params and grads that start one element into a buffer
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
            torch.bfloat16: torch.int16, torch.float16: torch.int16}
# (param dtype, layout): states in the param's dtype, fp32 master weights
# (states fp32), or states in another dtype
LAYOUTS = [(torch.float32, "plain"), (torch.float32, "bf16-state"), (torch.float64, "plain"),
           (torch.bfloat16, "plain"), (torch.bfloat16, "master"), (torch.bfloat16, "fp32-state"),
           (torch.float16, "plain"), (torch.float16, "master")]


def _state_dtype(dtype, layout):
    return {"plain": dtype, "master": torch.float32, "bf16-state": torch.bfloat16,
            "fp32-state": torch.float32}[layout]


def _to_device(host, dev):
    out = []
    for i, x in enumerate(host):
        if i in MISALIGNED:
            y = torch.empty(x.numel() + 1, dtype=x.dtype, device=dev)[1:].view(x.shape)
            y.copy_(x)
        else:
            y = x.to(dev, copy=True)
        out.append(y)
    return out


def assert_bitwise(cuda, cpu, what, tol=None):
    """Every element of the CUDA tensors has the bits of the CPU one (or,
    with tol, is within it)."""
    assert len(cuda) == len(cpu), what
    for i, (y, x) in enumerate(zip(cuda, cpu)):
        y = y.detach().cpu()
        assert y.dtype == x.dtype and y.shape == x.shape, (what, i, y.dtype, x.dtype, y.shape, x.shape)
        if tol is not None:
            torch.testing.assert_close(y, x, **tol, msg=lambda m, i=i: f"{what}[{i}]: {m}")
            continue
        same = y.contiguous().view(INT_VIEW[x.dtype]) == x.contiguous().view(INT_VIEW[x.dtype])
        if not bool(same.all()):
            j = int((~same).flatten().nonzero()[0])
            raise AssertionError(
                f"{what}[{i}]: {int((~same).sum())} of {x.numel()} elements differ in their bits; "
                f"first at flat index {j}: cuda {y.flatten()[j].item()!r}, cpu {x.flatten()[j].item()!r}")


def _bitwise_inputs(dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    st = _state_dtype(dtype, layout)
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in BITWISE_SHAPES]
    states = [[(torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(st) for s in BITWISE_SHAPES],
              [(torch.rand(s, generator=g, dtype=torch.float64) * 0.01).to(st) for s in BITWISE_SHAPES],
              [(torch.rand(s, generator=g, dtype=torch.float64) * 0.02).to(st) for s in BITWISE_SHAPES]]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in BITWISE_SHAPES]
             for _ in range(3)]
    return ps, states, grads


def _step_norms(grads, clip):
    """Per step: the grad_norm tensor both backends get (the CPU kernel's
    norm) and max_norm, about half of it, so that the clip acts."""
    out = []
    for gs in grads:
        if not clip:
            out.append((None, 0.0))
            continue
        norm = ops.multi_tensor_norm(gs, 2.0)
        out.append((norm, 0.5 * norm.item()))
    return out


def _compare(out, ps, tol=None):
    assert not torch.equal(out["cpu"]["params"][4], ps[4])  # the steps did write
    for k, xs in out["cpu"].items():
        assert_bitwise(out[DEV][k], xs, k, None if k == "state_steps" else tol)


ADAM_BITWISE = {
    "adamw": dict(decay_mode=1),
    "l2-amsgrad-scaled": dict(decay_mode=0, amsgrad=True, scaled=True),
    "independent-maximize-lrtensor": dict(decay_mode=2, maximize=True, lr_tensor=True),
    "amsgrad-maximize-scaled-lrtensor": dict(decay_mode=1, amsgrad=True, maximize=True, scaled=True,
                                             lr_tensor=True),
    "corrected-lrtensor": dict(decay_mode=3, lr_tensor=True),
    "cautious-amsgrad-maximize": dict(decay_mode=1, cautious=True, amsgrad=True, maximize=True),
    "cautious-corrected-scaled": dict(decay_mode=3, cautious=True, scaled=True),
    "l1-amsgrad-maximize": dict(decay_mode=4, amsgrad=True, maximize=True),
    # threshold lr * wd = 0.02: some elements become exact zeros
    "l1_proximal-scaled-lrtensor": dict(decay_mode=5, wd=2.0, scaled=True, lr_tensor=True),
}


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("case", list(ADAM_BITWISE))
@pytest.mark.parametrize("dtype,layout", LAYOUTS, ids=[f"{str(d)[6:]}-{lay}" for d, lay in LAYOUTS])
def test_adam_matches_cpu_kernels_bitwise(dtype, layout, case, clip):
    # fp64: betas whose powers are exact, see above
    _adam_vs_cpu(dtype, layout, case, clip, (0.5, 0.75) if dtype == torch.float64 else (0.9, 0.999))


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("case", list(ADAM_BITWISE))
def test_adam_fp64_usual_betas_match_cpu_kernels_to_ulps(case, clip):
    # 0.9**t and 0.999**t, which glibc and CUDA may round differently (see above)
    _adam_vs_cpu(torch.float64, "plain", case, clip, (0.9, 0.999), tol=FP64_LAST_BITS)


def _adam_vs_cpu(dtype, layout, case, clip, betas, tol=None):
    opt = ADAM_BITWISE[case]
    ps, (ms, vs, vmaxs), grads = _bitwise_inputs(dtype, layout, seed=11)
    norms = _step_norms(grads, clip)
    out = {}
    for dev in ("cpu", DEV):
        p, m, v = _to_device(ps, dev), _to_device(ms, dev), _to_device(vs, dev)
        vmax = _to_device(vmaxs, dev) if opt.get("amsgrad") else []
        master = [x.float() for x in p] if layout == "master" else []
        steps = [torch.tensor(3.0, device=dev) for _ in p]
        lr_t = torch.tensor(0.01, device=dev) if opt.get("lr_tensor") else None
        scale = torch.tensor(3.0, device=dev) if opt.get("scaled") else None
        found = torch.zeros((), device=dev) if opt.get("scaled") else None
        for gs, (norm, max_norm) in zip(grads, norms):
            ops.adam_(p, _to_device(gs, dev), m, v, vmax, steps, master, [], **adam_hyper(
                lr=0.01, lr_tensor=lr_t, beta1=betas[0], beta2=betas[1], weight_decay=opt.get("wd", 0.1),
                decay_mode=opt["decay_mode"], cautious_wd=bool(opt.get("cautious")), initial_lr=0.02,
                amsgrad=bool(opt.get("amsgrad")),
                maximize=bool(opt.get("maximize")), grad_norm=None if norm is None else norm.to(dev),
                max_norm=max_norm, grad_scale=scale, found_inf=found))
        out[dev] = dict(params=p, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=vmax, master_params=master,
                        state_steps=steps)
    _compare(out, ps, tol)


SGD_BITWISE = {
    "no-momentum-l2": dict(momentum=0.0, decay_mode=0),
    "momentum-dampening-decoupled-scaled": dict(momentum=0.9, dampening=0.1, decay_mode=1, scaled=True),
    "nesterov-independent-maximize": dict(momentum=0.9, nesterov=True, decay_mode=2, maximize=True),
    "momentum-l2-maximize-lrtensor": dict(momentum=0.9, decay_mode=0, maximize=True, lr_tensor=True),
    "no-momentum-cautious-corrected": dict(momentum=0.0, decay_mode=3, cautious=True),
    "nesterov-cautious-independent-maximize": dict(momentum=0.9, nesterov=True, decay_mode=2, cautious=True,
                                                   maximize=True),
    "momentum-cautious-lrtensor": dict(momentum=0.9, decay_mode=1, cautious=True, lr_tensor=True),
    "nesterov-l1-maximize": dict(momentum=0.9, nesterov=True, decay_mode=4, maximize=True),
    # threshold lr * wd = 0.02: some elements become exact zeros
    "no-momentum-l1_proximal-lrtensor": dict(momentum=0.0, decay_mode=5, wd=2.0, lr_tensor=True),
    "momentum-l1_proximal-scaled": dict(momentum=0.9, decay_mode=5, wd=2.0, scaled=True),
}


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("case", list(SGD_BITWISE))
@pytest.mark.parametrize("dtype,layout", LAYOUTS, ids=[f"{str(d)[6:]}-{lay}" for d, lay in LAYOUTS])
def test_sgd_matches_cpu_kernels_bitwise(dtype, layout, case, clip):
    opt = SGD_BITWISE[case]
    ps, (bufs, _, _), grads = _bitwise_inputs(dtype, layout, seed=12)
    norms = _step_norms(grads, clip)
    momentum = opt["momentum"]
    out = {}
    for dev in ("cpu", DEV):
        p = _to_device(ps, dev)
        b = _to_device(bufs, dev) if momentum else []
        master = [x.float() for x in p] if layout == "master" else []
        lr_t = torch.tensor(0.01, device=dev) if opt.get("lr_tensor") else None
        scale = torch.tensor(3.0, device=dev) if opt.get("scaled") else None
        found = torch.zeros((), device=dev) if opt.get("scaled") else None
        for s, (gs, (norm, max_norm)) in enumerate(zip(grads, norms)):
            # on the first step, every other buffer is new: set to the gradient, not decayed
            new = [s == 0 and i % 2 == 1 for i in range(len(p))] if momentum else []
            ops.sgd_(p, _to_device(gs, dev), b, new, master, [], [], **sgd_hyper(
                lr=0.01, lr_tensor=lr_t, momentum=momentum, dampening=opt.get("dampening", 0.0),
                nesterov=bool(opt.get("nesterov")), weight_decay=opt.get("wd", 0.1), decay_mode=opt["decay_mode"],
                cautious_wd=bool(opt.get("cautious")), initial_lr=0.02, maximize=bool(opt.get("maximize")),
                grad_norm=None if norm is None else norm.to(dev), max_norm=max_norm, grad_scale=scale,
                found_inf=found))
        out[dev] = dict(params=p, momentum_buffers=b, master_params=master)
    _compare(out, ps)


def test_bitwise_comparison_is_not_vacuous():
    """The bitwise check sees a one-ulp difference."""
    x = torch.randn(100, dtype=torch.float64)
    y = x.clone()
    y[37] = torch.nextafter(y[37], torch.tensor(math.inf, dtype=torch.float64))
    with pytest.raises(AssertionError, match="1 of 100 elements differ"):
        assert_bitwise([y], [x], "params")
    assert_bitwise([x.clone()], [x], "params")


# ------------------------------------------------------------- op semantics


def _adam_args(n=3, dtype=torch.float32, **over):
    shapes = [(100,), (7, 9), ()][:n]
    p = [x.to(DEV) for x in host_params(dtype, shapes)]
    g = [x.to(DEV) for x in host_grads(shapes, 0, dtype=dtype)]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    steps = [torch.zeros((), device=DEV) for _ in p]
    kw = dict(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=[], state_steps=steps,
              master_params=[], sr_ids=[], **adam_hyper(lr=1e-2, decay_mode=1, initial_lr=1e-2))
    kw.update(over)
    return kw


def _snapshot(kw):
    return [t.clone() for k in ("params", "exp_avgs", "exp_avg_sqs", "state_steps") for t in kw[k]]


@pytest.mark.parametrize("how", ["found_inf", "inf_norm", "nan_norm"])
def test_adam_skip_writes_nothing(how):
    over = dict(found_inf=torch.ones((), device=DEV)) if how == "found_inf" else dict(
        grad_norm=torch.tensor(math.inf if how == "inf_norm" else math.nan, device=DEV), max_norm=1.0)
    kw = _adam_args(**over)
    before = _snapshot(kw)
    ops.adam_(**kw)
    for x, y in zip(before, _snapshot(kw)):
        assert torch.equal(x, y)
    # and the step counters of a step that is not skipped do advance
    kw = _adam_args(found_inf=torch.zeros((), device=DEV))
    ops.adam_(**kw)
    assert all(s.item() == 1.0 for s in kw["state_steps"])


def test_adam_nonfinite_norm_without_skip():
    """skip_nonfinite=False: an infinite norm clips the gradient to zero."""
    kw = _adam_args(grad_norm=torch.tensor(math.inf, device=DEV), max_norm=1.0, skip_nonfinite=False)
    p0 = [p.clone() for p in kw["params"]]
    ops.adam_(**kw)
    for x, y in zip(p0, kw["params"]):
        assert torch.equal(x, y)  # g == 0 on the first step: no move (no decay)
    assert all(s.item() == 1.0 for s in kw["state_steps"])
    assert all(torch.count_nonzero(m) == 0 for m in kw["exp_avgs"])


def test_lr_tensor_forms_and_float64_steps_agree():
    lr = 2.0 ** -7  # exact in float32
    out = []
    for form in ["float", "cpu64", "cuda32", "cuda64"]:
        lr_t = {"float": None, "cpu64": torch.tensor(lr, dtype=torch.float64),
                "cuda32": torch.tensor(lr, device=DEV),
                "cuda64": torch.tensor(lr, dtype=torch.float64, device=DEV)}[form]
        kw = _adam_args(lr=lr if form == "float" else 0.0, lr_tensor=lr_t)
        if form == "cuda64":
            kw["state_steps"] = [torch.zeros((), dtype=torch.float64, device=DEV) for _ in kw["params"]]
        for _ in range(3):
            ops.adam_(**kw)
        assert all(s.item() == 3.0 for s in kw["state_steps"])
        out.append(kw["params"])
    for ps in out[1:]:
        for x, y in zip(out[0], ps):
            assert torch.equal(x, y)


def test_multi_tensor_norm_values_and_nonfinite():
    shapes = [(1000,), (3, 7), (), (0,), (70000,)]
    ts = [x.to(DEV) for x in host_grads(shapes, 0)]
    ref = torch.cat([t.double().flatten().cpu() for t in ts])
    torch.testing.assert_close(ops.multi_tensor_norm(ts, 2.0).cpu(), ref.norm().float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ops.multi_tensor_norm(ts, math.inf).cpu(), ref.abs().max().float(),
                               rtol=0, atol=0)
    out = ops.multi_tensor_norm(ts, 2.0)
    assert out.dim() == 0 and out.dtype == torch.float32 and out.device == ts[0].device
    for bad, l2, linf in [(math.inf, math.inf, math.inf), (-math.inf, math.inf, math.inf),
                          (math.nan, math.nan, math.nan)]:
        t2 = [t.clone() for t in ts]
        t2[-1][60000] = bad  # in a late chunk of the last tensor
        r2 = ops.multi_tensor_norm(t2, 2.0).item()
        ri = ops.multi_tensor_norm(t2, math.inf).item()
        assert (math.isnan(r2) if math.isnan(l2) else r2 == l2), (bad, r2)
        assert (math.isnan(ri) if math.isnan(linf) else ri == linf), (bad, ri)
    zero = ops.multi_tensor_norm([torch.empty(0, device=DEV)], 2.0)
    assert zero.item() == 0.0
    with pytest.raises(RuntimeError):
        ops.multi_tensor_norm([], 2.0)
    with pytest.raises(RuntimeError):
        ops.multi_tensor_norm(ts, 1.0)


def test_multi_tensor_norm_mixed_dtypes_and_strides():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(300, generator=g).to(dt).to(DEV) for dt in DTYPES]
    big = torch.randn(64, 130, generator=g).to(DEV)
    ts += [big[:, ::3], big.t(), big[1:, 1:]]  # non-dense, transposed, offset
    ref = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    assert ops.multi_tensor_norm(ts, 2.0).item() == pytest.approx(ref, rel=1e-6)
    ref_inf = max(float(t.double().abs().max()) for t in ts)
    assert ops.multi_tensor_norm(ts, math.inf).item() == pytest.approx(ref_inf, rel=1e-7)


@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_op(max_norm):
    g = torch.Generator().manual_seed(6)
    big = torch.randn(50, 40, generator=g).to(DEV)
    ts = [torch.randn(n, generator=g).to(dt).to(DEV) for n, dt in zip([1, 100, 20000, 7], DTYPES)]
    ts.append(big[:, ::2])  # non-dense: written back through a temporary
    before = [t.clone() for t in ts]
    big_before = big.clone()
    norm = torch.tensor(3.0, device=DEV)
    ops.clip_(ts, norm, max_norm)
    # clip_coef of math.h, in float32
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    coef = torch.clamp(f32(max_norm) / (f32(3.0) + f32(1e-6)), max=1.0)
    for x, y in zip(before, ts):
        want = (x.float() * coef.to(DEV)).to(x.dtype) if x.dtype != torch.float64 else x * coef.double().to(DEV)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    assert torch.equal(big[:, 1::2], big_before[:, 1::2])  # the other columns are untouched


def test_fused_clip_grad_norm_matches_torch():
    ps = leaves(host_params(torch.float32, [(300, 7), (1000,), (), (5, 5)]))
    qs = leaves([p.detach() for p in ps])
    for s, (p, q) in enumerate(zip(ps, qs)):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(s)).to(DEV)
        p.grad, q.grad = g.clone(), g.clone()
    for norm_type in (2.0, math.inf):
        nt = torch.nn.utils.clip_grad_norm_(ps, 0.3, norm_type)
        nf = fused_wd.clip_grad_norm_(qs, 0.3, norm_type)
        torch.testing.assert_close(nf, nt, rtol=1e-6, atol=0)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ determinism


def test_determinism_bitwise():
    shapes = [(1 << 20,), (1000, 333), (7,), ()] + [(n,) for n in range(1, 200, 13)]

    def run():
        ps = leaves(host_params(torch.float32, shapes))
        opt = fused_wd.AdamW(ps, lr=1e-3, max_grad_norm=0.5)
        norms = []
        for s in range(3):
            for p, g in zip(ps, host_grads(shapes, s)):
                p.grad = g.to(DEV)
            opt.step()
            norms.append(opt.last_grad_norm.clone())
        return [p.detach().clone() for p in ps], norms

    p1, n1 = run()
    p2, n2 = run()
    for x, y in zip(p1 + n1, p2 + n2):
        assert torch.equal(x, y)
    gs = [g.to(DEV) for g in host_grads(shapes, 0)]
    for norm_type in (2.0, math.inf):
        first = ops.multi_tensor_norm(gs, norm_type).view(torch.int32).item()
        for _ in range(20):
            assert ops.multi_tensor_norm(gs, norm_type).view(torch.int32).item() == first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["AdamW", "AdamW-inf", "Adam-amsgrad", "SGD-nesterov"])
def test_whole_steps_match_cpu(name, dtype):
    """Clipped steps through the optimizer classes, norm included, on both
    backends. The CPU and CUDA kernels sum the squares in different orders
    (docs/design.md, "The global norm"), so a norm may differ in its last
    float32 bit; while the norms agree, params and every state tensor agree
    bit for bit, after that within TOL. (On an H200, with these inputs, the
    norms and the bits agreed for AdamW, Adam and SGD in fp32 and bf16.)"""
    cls, *opt = name.split("-")
    kw = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    if cls == "SGD":
        kw = dict(kw, momentum=0.9, nesterov=True, weight_decay=1e-2)
    if "amsgrad" in opt:
        kw["amsgrad"] = True
    if "inf" in opt:
        kw["norm_type"] = math.inf
    shapes = [(4096, 1024), (1000, 37), (5,), (), (300001,), (2048,), (17, 3, 3)]
    out = {}
    for dev in ("cpu", DEV):
        ps = [p.detach().clone().requires_grad_(True) for p in make_params(dtype, dev, 3, shapes)]
        o = getattr(fused_wd, cls)(ps, **kw)
        norms = []
        for s in range(4):
            for p, g in zip(ps, make_grads(ps, s, 3, scale=3.0)):
                p.grad = g
            o.step()
            norms.append(o.last_grad_norm.cpu().clone())
        out[dev] = ([p.detach().cpu() for p in ps], torch.stack(norms),
                    [v.cpu() for p in ps for _, v in sorted(o.state[p].items()) if torch.is_tensor(v)])
    cpu_norms, cuda_norms = out["cpu"][1], out[DEV][1]
    assert (cpu_norms > 1.0).all()  # every step clipped
    ulps = (cuda_norms.view(torch.int32) - cpu_norms.view(torch.int32)).abs()
    assert (ulps <= 1).all(), (cuda_norms, cpu_norms)
    tol = None if torch.equal(cuda_norms, cpu_norms) else tol_for(dtype)
    for what, i in (("params", 0), ("state", 2)):
        assert_bitwise(out[DEV][i], out["cpu"][i], what, tol)


def _launches_per_step(n, size):
    from torch.profiler import ProfilerActivity, profile
    ps = [torch.randn(size, device=DEV, requires_grad=True) for _ in range(n)]
    opt = fused_wd.AdamW(ps, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def test_launches_per_step_grow_slowly_with_the_tensor_count():
    """A clipped AdamW step: norm partials, per-tensor parts, the norm, the
    update and the step counters, one launch each per table. With CUDA 12.1's
    32 KB kernel arguments a table holds about 500 tensors of the update (a
    4 KB one held 57: 13 launches for 201 tensors, 172 for 4000, on an H100)."""
    assert _launches_per_step(201, 4096) <= 6
    assert _launches_per_step(4000, 16) <= 25


# -------------------------------------------------- multi-tensor apply edges


def test_ten_thousand_small_tensors():
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(0, 64, (10_000,), generator=g).tolist()
    base = [torch.randn(n, generator=g) for n in sizes]
    a, b = leaves(base), leaves(base)
    c, d = leaves(base), leaves(base)
    ta = torch.optim.AdamW(a, lr=1e-2, fused=True)
    fb = fused_wd.AdamW(b, lr=1e-2, max_grad_norm=1.0)
    tc = torch.optim.SGD(c, lr=1e-2, momentum=0.9, fused=True)
    fd = fused_wd.SGD(d, lr=1e-2, momentum=0.9, max_grad_norm=1.0)
    for s in range(3):
        gs = [torch.randn(n, generator=g).to(DEV) for n in sizes]
        for ps in (a, b, c, d):
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
        nt = torch.nn.utils.clip_grad_norm_(a, 1.0)
        torch.nn.utils.clip_grad_norm_(c, 1.0)
        ta.step(), fb.step(), tc.step(), fd.step()
        torch.testing.assert_close(fb.last_grad_norm, nt, rtol=1e-6, atol=0)
    for x, y in ((a, b), (c, d)):
        torch.testing.assert_close(torch.cat([p.detach() for p in y]), torch.cat([p.detach() for p in x]),
                                   **TOL[torch.float32])
    ref = torch.cat([p.detach().double().flatten() for p in a])
    torch.testing.assert_close(ops.multi_tensor_norm([p.detach() for p in a], 2.0),
                               ref.norm().float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_misaligned_and_strided_views(dtype):
    """Params and grads that are views of big buffers at odd element offsets
    (no 16-byte alignment: the scalar path), plus a non-dense and a
    transposed param; nothing outside the views may be written."""
    g = torch.Generator().manual_seed(8)
    shapes = [(37, 19), (5,), (16384 * 2 + 3,), (1,), (3, 4, 5)]
    pbuf = torch.randn(200_000, generator=g).to(dtype).to(DEV)
    gbuf = torch.randn(200_000, generator=g).to(dtype).to(DEV)
    pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
    views, gviews, off, goff = [], [], 1, 3
    mask = torch.ones(pbuf.numel(), dtype=torch.bool, device=DEV)
    for s in shapes:
        n = math.prod(s)
        views.append(pbuf[off:off + n].view(s))
        gviews.append(gbuf[goff:goff + n].view(s))
        mask[off:off + n] = False
        off += n + 2
        goff += n + 6
    wide1 = torch.randn(64, 90, generator=g).to(dtype).to(DEV)
    wide2 = torch.randn(64, 90, generator=g).to(dtype).to(DEV)
    wide1_0, wide2_0 = wide1.clone(), wide2.clone()
    views += [wide1[:, ::3], wide2.t()[1:]]  # non-dense; dense but not contiguous
    gviews += [torch.randn(v.shape, generator=g).to(dtype).to(DEV) for v in views[-2:]]
    impl = impl_kwargs(torch_impls(dtype)[0])
    for make_t, make_f in [
        (lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True, **impl),
         lambda p: fused_wd.AdamW(p, lr=0.01, amsgrad=True)),
        (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, **impl),
         lambda p: fused_wd.SGD(p, lr=0.01, momentum=0.9, nesterov=True)),
    ]:
        ref = [v.detach().clone().contiguous() for v in views]
        ta, fb = make_t(ref), make_f(views)
        for _ in range(3):
            for p, q, gv in zip(ref, views, gviews):
                p.grad = gv.clone().contiguous()
                q.grad = gv
            ta.step()
            fb.step()
        assert_same(ref, views, ta, fb, TOL[dtype])
    assert not torch.equal(pbuf, pbuf0)
    assert torch.equal(pbuf[mask], pbuf0[mask])  # gaps and tail untouched
    assert torch.equal(gbuf, gbuf0)  # grads are read only
    keep = torch.ones(90, dtype=torch.bool, device=DEV)
    keep[::3] = False
    assert torch.equal(wide1[:, keep], wide1_0[:, keep])
    assert not torch.equal(wide1[:, ::3], wide1_0[:, ::3])
    assert torch.equal(wide2[:, 0], wide2_0[:, 0])


def test_aligned_and_misaligned_paths_agree_bitwise():
    """The same data through the 16-byte vector path and the scalar path."""
    g = torch.Generator().manual_seed(9)
    n = 16384 * 3 + 11
    p0, g0 = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    pbuf = torch.zeros(n + 1, device=DEV)
    gbuf = torch.zeros(n + 1, device=DEV)
    pa, ga = p0.clone(), g0.clone()
    pm, gm = pbuf[1:], gbuf[1:]
    pm.copy_(p0)
    gm.copy_(g0)
    assert pm.data_ptr() % 16 != 0
    for p, gr in ((pa, ga), (pm, gm)):
        opt = fused_wd.AdamW([p], lr=1e-2)
        p.grad = gr
        for _ in range(3):
            opt.step()
    assert torch.equal(pa, pm)


def test_tensor_past_2_31_elements():
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GB of free GPU memory")
    n = 2**31 + 4099
    dt = torch.bfloat16
    p = torch.empty(n, dtype=dt, device=DEV).normal_()
    gr = torch.empty(n, dtype=dt, device=DEV).normal_()
    gr[2**31 + 5] = 1000.0
    ranges = [(0, 4096), (2**31 - 2048, 2**31 + 2048), (n - 3000, n)]
    small = [p[s:e].clone() for s, e in ranges]
    gsmall = [gr[s:e].clone() for s, e in ranges]
    assert ops.multi_tensor_norm([gr], math.inf).item() == 1000.0
    l2 = math.sqrt(sum(float((c.double() ** 2).sum()) for c in gr.split(2**28)))
    assert ops.multi_tensor_norm([gr], 2.0).item() == pytest.approx(l2, rel=1e-5)
    opt = fused_wd.AdamW([p], lr=0.1, weight_decay=0.1)
    ref = torch.optim.AdamW(small, lr=0.1, weight_decay=0.1, fused=True)
    p.grad = gr
    for x, gx in zip(small, gsmall):
        x.grad = gx
    for _ in range(2):
        opt.step()
        ref.step()
    st = opt.state[p]
    for (s, e), x in zip(ranges, small):
        torch.testing.assert_close(p[s:e], x, **TOL[dt])
        torch.testing.assert_close(st["exp_avg"][s:e], ref.state[x]["exp_avg"], **TOL[dt])
        torch.testing.assert_close(st["exp_avg_sq"][s:e], ref.state[x]["exp_avg_sq"], **TOL[dt])
    assert st["step"].item() == 2.0


# ------------------------------------------------------------ no host sync


@pytest.mark.parametrize("name", ["AdamW", "Adam-amsgrad", "SGD"])
def test_step_does_not_sync(name):
    shapes = [(300, 7), (1000,), (), (5, 5)]
    ps = leaves(host_params(torch.float32, shapes))
    if name == "SGD":
        opt = fused_wd.SGD(ps, lr=1e-2, momentum=0.9, max_grad_norm=1.0)
    else:
        opt = fused_wd.AdamW(ps, lr=1e-2, amsgrad=name == "Adam-amsgrad", max_grad_norm=1.0)
    for p, g in zip(ps, host_grads(shapes, 0)):
        p.grad = (g * 1024).to(DEV)
    opt.step()  # creates the state
    # GradScaler-style device tensors, as torch.amp.GradScaler.step hands them
    opt.grad_scale = torch.full((), 1024.0, device=DEV)
    opt.found_inf = torch.zeros((), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step()
        fused_wd.clip_grad_norm_(ps, 0.5)
        ops.multi_tensor_norm([p.grad for p in ps], math.inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["scheduled", "adaptive"])
def test_automatic_decay_and_weight_norm_do_not_sync(mode):
    """The automatic modes read their statistics on the device, and
    last_weight_norm is a device tensor: no host sync in either, a
    GradScaler driving the step."""
    shapes = [(300, 7), (1000,), (), (5, 5)]
    ps = leaves(host_params(torch.float32, shapes))
    opt = fused_wd.AdamW(ps, lr=1e-2, weight_decay=0.1, weight_decay_mode=mode, max_grad_norm=1.0)
    for p, g in zip(ps, host_grads(shapes, 0)):
        p.grad = (g * 1024).to(DEV)
    opt.step()  # creates the state, reads the statistics once
    assert opt.last_weight_norm is not None
    opt.grad_scale = torch.full((), 1024.0, device=DEV)
    opt.found_inf = torch.zeros((), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step()
            norm = opt.last_weight_norm
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in ps))
    torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0)


# ---------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("lr_kind", ["tensor", "float"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_graph_capture(name, lr_kind):
    shapes = [(300, 7), (1000,), (), (40000,)]
    base = host_params(torch.float32, shapes)
    lr_a = torch.tensor(1e-3, device=DEV) if lr_kind == "tensor" else 1e-3
    lr_b = torch.tensor(1e-3, device=DEV) if lr_kind == "tensor" else 1e-3
    a, b = leaves(base), leaves(base)
    if name == "AdamW":
        oa = fused_wd.AdamW(a, lr=lr_a, capturable=True, max_grad_norm=1.0)
        ob = fused_wd.AdamW(b, lr=lr_b, capturable=True, max_grad_norm=1.0)
    else:
        oa = fused_wd.SGD(a, lr=lr_a, momentum=0.9, max_grad_norm=1.0)
        ob = fused_wd.SGD(b, lr=lr_b, momentum=0.9, max_grad_norm=1.0)
    static = [torch.zeros(s, device=DEV) for s in shapes]
    for p, g in zip(a, static):
        p.grad = g
    for p in b:
        p.grad = torch.zeros_like(p)

    def load(step):
        for sg, p, g in zip(static, b, host_grads(shapes, step)):
            sg.copy_(g)
            p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in range(3):
            load(w)
            oa.step()
            ob.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
    for s in range(3, 9):
        if s == 6 and lr_kind == "tensor":
            lr_a.fill_(5e-4)  # the replay reads the lr on the device
            lr_b.fill_(5e-4)
        load(s)
        graph.replay()
        ob.step()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        for k, v in oa.state[x].items():
            assert torch.equal(v, ob.state[y][k]), k
    assert torch.equal(oa.last_grad_norm, ob.last_grad_norm)


def test_norm_in_backward_under_step_capture(monkeypatch):
    """A step captured in a CUDA graph reads every grad itself: the hooks'
    parts are proven in Python, which a replay does not run. Here the hooks
    read the grads of an eager backward, the step is captured while those
    grads are unchanged, and each replay follows a copy into the same grads
    (no backward, no hook): the result must be that of the default path."""
    monkeypatch.setattr(fused_wd._norm_slots, "_HOOK_READ_MIN", 1)
    shapes = [(300, 7), (1000,), (40000,)]
    base = host_params(torch.float32, shapes)
    a, b = leaves(base), leaves(base)
    oa = fused_wd.AdamW(a, lr=1e-3, capturable=True, max_grad_norm=1.0, norm_in_backward=True)
    ob = fused_wd.AdamW(b, lr=1e-3, capturable=True, max_grad_norm=1.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in range(3):
            gs = [g.to(DEV) for g in host_grads(shapes, w)]
            for p in a:
                p.grad = None
            sum((p * g).sum() for p, g in zip(a, gs)).backward()  # p.grad is g: the hooks read it
            for p, g in zip(b, gs):
                p.grad = g.clone()
            oa.step()
            ob.step()
    torch.cuda.current_stream().wait_stream(side)
    assert oa.norm_stats["from_backward"] == 3 * len(shapes)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
    for s in range(3, 7):
        for pa, pb, g in zip(a, b, host_grads(shapes, s)):
            pa.grad.copy_(g)
            pb.grad.copy_(g)
        graph.replay()
        ob.step()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k, v in oa.state[x].items():
            assert torch.equal(v, ob.state[y][k]), k
    assert torch.equal(oa.last_grad_norm, ob.last_grad_norm)


def test_cpu_lr_tensor_is_refused_under_capture():
    """A CPU lr tensor would be read once, at capture, and frozen into the
    graph: refused with a message saying where to put it."""
    p = leaves(host_params(torch.float32, [(64,)]))
    opt = fused_wd.AdamW(p, lr=torch.tensor(1e-3), capturable=True)
    p[0].grad = torch.ones(64, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    before = p[0].detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="frozen into the graph"):
        with torch.cuda.graph(graph):
            opt.step()
    assert torch.equal(p[0], before)


@pytest.mark.parametrize("mode", ["independent", "decoupled"])
def test_tensor_hyperparameters_do_not_sync(mode):
    """Tensor betas/eps/weight_decay and a tensor lr (whose scheduler-style
    initial_lr is a tensor too) are not read back on every step."""
    p = leaves(host_params(torch.float32, [(300,), (7,)]))
    t = lambda x: torch.tensor(x, device=DEV)  # noqa: E731
    opt = fused_wd.AdamW(p, lr=t(1e-3), betas=(t(0.9), t(0.99)), eps=t(1e-8), weight_decay=t(0.1),
                         weight_decay_mode=mode, max_grad_norm=1.0)
    for x in p:
        x.grad = torch.ones_like(x)
    opt.step()  # reads each tensor hyperparameter once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("clip", [False, True])
def test_grad_scaler_fp16_autocast(clip):
    """torch's fused AdamW and fused_wd driven by GradScaler on the same
    scaled fp16-autocast gradients (computed once, by model_t, so that the
    runs differ by the optimizers alone)."""
    torch.manual_seed(0)
    model_t = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(DEV)
    model_f = copy.deepcopy(model_t)
    opt_t = torch.optim.AdamW(model_t.parameters(), lr=1e-3, fused=True)
    opt_f = fused_wd.AdamW(model_f.parameters(), lr=1e-3, max_grad_norm=1.0 if clip else None)
    sc_t = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    sc_f = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    g = torch.Generator(device=DEV).manual_seed(1)
    for step in range(6):
        x = torch.randn(16, 32, device=DEV, generator=g)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model_t(x).float().pow(2).mean()
        sc_t.scale(loss).backward()
        sc_f.scale(loss)  # GradScaler wants scale() once per iteration before step()
        if step == 3:  # an overflow: both skip the step and lower the scale
            model_t[0].weight.grad[0, 0] = math.inf
        for p, q in zip(model_t.parameters(), model_f.parameters()):
            q.grad = p.grad.clone()
        if clip:
            sc_t.unscale_(opt_t)
            torch.nn.utils.clip_grad_norm_(model_t.parameters(), 1.0)
        for opt, sc in ((opt_t, sc_t), (opt_f, sc_f)):
            sc.step(opt)
            sc.update()
            opt.zero_grad(set_to_none=True)
        assert sc_t.get_scale() == sc_f.get_scale()
        assert_same(list(model_t.parameters()), list(model_f.parameters()), opt_t, opt_f, TOL[torch.float32])
    assert opt_f.state[model_f[0].weight]["step"].item() == 5.0


# -------------------------------------------------- dtypes and devices


def test_mixed_dtypes_one_global_norm():
    shapes = [(40, 3), (100,), (), (16390,)]
    base = [p for dt in DTYPES for p in host_params(dt, shapes, seed=DTYPES.index(dt))]
    a, b = leaves(base), leaves(base)
    hp = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    oa, ob = fused_wd.reference.AdamW(a, **hp), fused_wd.AdamW(b, **hp)
    for s in range(4):
        for x, y in zip(a, b):
            gr = torch.randn(x.shape, generator=torch.Generator().manual_seed(s)).to(x.dtype).to(DEV)
            x.grad, y.grad = gr.clone(), gr.clone()
        want = math.sqrt(sum(float((y.grad.double() ** 2).sum()) for y in b))
        oa.step()
        ob.step()
        assert ob.last_grad_norm.item() == pytest.approx(want, rel=1e-6)
    for x, y in zip(a, b):
        # fp32 tensors in the norm: CUDA sums them in fp32 per thread, the reference in fp64
        torch.testing.assert_close(y, x, **tol_for(x.dtype, clipped=True, reference=True))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_params_on_two_gpus():
    shapes = [(40, 3), (100,), (), (20000,)]
    base = host_params(torch.float32, shapes)
    devs = ["cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    a = [p.clone().to(d).requires_grad_() for p, d in zip(base, devs)]
    b = [p.clone().to(d).requires_grad_() for p, d in zip(base, devs)]
    c = [p.clone().to("cuda:0").requires_grad_() for p in base]
    hp = dict(lr=1e-2, max_grad_norm=0.5)
    oa, ob = fused_wd.reference.AdamW(a, **hp), fused_wd.AdamW(b, **hp)
    oc = fused_wd.AdamW(c, **hp)
    for s in range(3):
        for x, y, z, gr in zip(a, b, c, host_grads(shapes, s)):
            x.grad, y.grad, z.grad = gr.to(x.device), gr.to(y.device), gr.to(z.device)
        oa.step(), ob.step(), oc.step()
        torch.testing.assert_close(ob.last_grad_norm.cpu(), oc.last_grad_norm.cpu(), rtol=1e-6, atol=0)
    for x, y, z in zip(a, b, c):
        assert y.device == x.device
        torch.testing.assert_close(y, x, **TOL[torch.float32])
        torch.testing.assert_close(y.cpu(), z.cpu(), **TOL[torch.float32])
        assert ob.state[y]["exp_avg"].device == y.device


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda(dtype):
    shapes = [(3, 4), (5,), ()]

    def fresh():
        p = [x.to(DEV) for x in host_params(dtype, shapes)]
        g = [x.to(DEV) for x in host_grads(shapes, 0, dtype=dtype)]
        return p, g

    p, g = fresh()
    torch.library.opcheck(ops.multi_tensor_norm.default, (g, 2.0))
    torch.library.opcheck(ops.multi_tensor_norm.default, (g, math.inf))
    norm = torch.tensor(2.5, device=DEV)
    torch.library.opcheck(ops.clip_.default, ([x.clone() for x in g], norm, 1.0))
    z = lambda: [torch.zeros_like(x) for x in p]  # noqa: E731
    steps = [torch.zeros((), device=DEV) for _ in p]
    scale = torch.tensor(4.0, device=DEV)
    found = torch.zeros((), device=DEV)
    torch.library.opcheck(ops.adam_.default, (p, g, z(), z(), z(), steps, [], []), adam_hyper(
        lr=1e-3, weight_decay=0.01, decay_mode=1, initial_lr=1e-3, amsgrad=True, grad_norm=norm,
        max_norm=1.0, grad_scale=scale, found_inf=found))
    torch.library.opcheck(ops.adam_.default, (p, g, z(), z(), [], steps, [], []), adam_hyper(
        lr=0.0, lr_tensor=torch.tensor(1e-3, device=DEV), weight_decay=0.01, maximize=True))
    torch.library.opcheck(ops.sgd_.default, (p, g, z(), [True, False, True], [], [], []), sgd_hyper(
        momentum=0.9, nesterov=True, weight_decay=0.01, grad_norm=norm, max_norm=1.0,
        grad_scale=scale, found_inf=found))
    torch.library.opcheck(ops.sgd_.default, (p, g, [], [], [], [], []),
                          sgd_hyper(skip_nonfinite=False))


def test_cpu_checkpoint_into_cuda_optimizer():
    """A CPU checkpoint loaded into a CUDA optimizer: state moves to the GPU
    (torch's load_state_dict; the step counter on first use) and training
    continues as it would have on the CPU."""
    torch.manual_seed(0)
    p_cpu = torch.nn.Parameter(torch.randn(257))
    opt_cpu = fused_wd.AdamW([p_cpu], lr=0.01, max_grad_norm=1.0)
    grads = [torch.randn(257) for _ in range(4)]
    for g in grads[:2]:
        p_cpu.grad = g.clone()
        opt_cpu.step()
    sd = copy.deepcopy(opt_cpu.state_dict())
    p = torch.nn.Parameter(p_cpu.detach().clone().cuda())
    opt = fused_wd.AdamW([p], lr=0.01, max_grad_norm=1.0)
    opt.load_state_dict(sd)
    for g in grads[2:]:
        p_cpu.grad = g.clone()
        opt_cpu.step()
        p.grad = g.cuda()
        opt.step()
    for k, v in opt.state[p].items():
        assert v.device.type == "cuda", k
    torch.testing.assert_close(p.detach().cpu(), p_cpu.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_in_backward_is_bitwise_and_syncs_nothing(norm_type):
    """81 small params (no hooks: the step reads them in one launch) and a
    large weight (read by its hook): the hooks and the step do not sync with
    the host, and the result is the default path's, bit for bit."""
    results = []
    for nib in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(40)],
                                    torch.nn.Linear(32, 40000)).cuda()
        opt = fused_wd.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05,
                             norm_type=norm_type, norm_in_backward=nib)
        x = torch.randn(16, 32, device="cuda")
        for i in range(3):
            opt.zero_grad()
            loss = model(x).square().mean()
            torch.cuda.set_sync_debug_mode("error" if i else 0)  # step 0 creates the state
            try:
                loss.backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        results.append(([p.detach().clone() for p in model.parameters()],
                        opt.last_grad_norm.clone(), opt.norm_stats))
    (pa, na, sa), (pb, nb, sb) = results
    assert torch.equal(na, nb)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sa == {"from_backward": 3, "at_step": 0, "small": 81 * 3}


def test_norm_slots_follow_params_moved_to_another_device():
    """model.cuda() after the optimizer was made moves the same Parameter
    objects: the norm's slots are laid out again on the new device."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = fused_wd.AdamW(model.parameters(), max_grad_norm=0.1)
    model.cuda()
    x = torch.randn(2, 4, device="cuda")
    model(x).square().sum().backward()
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    opt.step()
    assert opt.last_grad_norm.device.type == "cuda"
    torch.testing.assert_close(opt.last_grad_norm, want, rtol=1e-6, atol=0)


# ------------------------------------- statistics, wd_tensor and auto_decay

# per-thread sums of at most 64 float terms, then float64 (see
# test_cuda_emulated.py, where the same code runs on the host)
STATS_RTOL = 4e-6
STATS_SHAPES = [(37, 19), (5,), (), (0,), (40001,), (16385,), (7,)]


def _stats_inputs(dtype, master, seed=31):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda s, dt, pos=False: (  # noqa: E731
        (torch.rand(s, generator=g, dtype=torch.float64) + 1e-3) if pos
        else torch.randn(s, generator=g, dtype=torch.float64)).to(dt)
    sd = torch.float32 if master else dtype
    return dict(params=[rnd(s, dtype) for s in STATS_SHAPES], grads=[rnd(s, dtype) for s in STATS_SHAPES],
                m=[0.1 * rnd(s, sd) for s in STATS_SHAPES],
                v=[0.01 * rnd(s, sd, True) for s in STATS_SHAPES],
                vmax=[0.02 * rnd(s, sd, True) for s in STATS_SHAPES],
                steps=[torch.tensor(3.0 + i) for i in range(len(STATS_SHAPES))],
                master=[rnd(s, torch.float32) for s in STATS_SHAPES] if master else [])


def _stats_call(ops, lists, optimizer, amsgrad, stats, slots, wd):
    n = len(lists["params"])
    if optimizer == "adam":
        ops.adam_(lists["params"], lists["grads"], lists["m"], lists["v"], lists["vmax"] if amsgrad else [],
                  lists["steps"], lists["master"], [], stats=stats, stat_slots=slots, wd_tensor=wd,
                  **adam_hyper(lr=0.05, weight_decay=1.0, decay_mode=1, amsgrad=amsgrad))
    else:
        ops.sgd_(lists["params"], lists["grads"], lists["m"], [False] * n, lists["master"], [], [],
                 stats=stats, stat_slots=slots, wd_tensor=wd,
                 **sgd_hyper(lr=0.05, momentum=0.9, weight_decay=1.0, decay_mode=0))


@pytest.mark.parametrize("case", ["adam-f32", "adam-f32-amsgrad", "adam-bf16-master", "sgd-f32",
                                  "sgd-bf16-master"])
def test_stats_and_wd_tensor_match_cpu_kernels(case):
    """The CUDA kernels' statistics equal the CPU kernels' (to the float
    rounding of the per-thread sums) and a float64 sum of the values they
    describe; a device wd_tensor decays like the CPU one; the updates agree
    bit for bit; and two runs give the same statistics bits."""
    optimizer, dt, *rest = case.split("-")
    dtype = dict(f32=torch.float32, bf16=torch.bfloat16)[dt]
    master, amsgrad = "master" in rest, "amsgrad" in rest
    base = _stats_inputs(dtype, master)
    n = len(STATS_SHAPES)
    slots = [(2 * i + 3) % (n + 2) for i in range(n)]  # distinct; slots 1 and n + 1 unused
    out = {}
    for run, dev in [("cpu", "cpu"), ("cuda", DEV), ("cuda again", DEV)]:
        lists = {k: [t.to(dev, copy=True) for t in v] for k, v in base.items()}
        stats = torch.full((2, n + 2), -1.0, dtype=torch.float64, device=dev)
        _stats_call(ops, lists, optimizer, amsgrad, stats, slots, torch.tensor(0.125, device=dev))
        out[run] = (lists, stats.cpu())
    assert torch.equal(out["cuda"][1], out["cuda again"][1])
    for k in base:
        assert_bitwise(out["cuda"][0][k], out["cpu"][0][k], k)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=STATS_RTOL, atol=0)
    vals = out["cpu"][0]["master" if master else "params"]
    psq = torch.tensor([float(t.double().pow(2).sum()) for t in vals], dtype=torch.float64)
    vsum = (torch.tensor([float(t.double().sum()) for t in out["cpu"][0]["v"]], dtype=torch.float64)
            if optimizer == "adam" else torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(out["cuda"][1][0, slots], psq, rtol=STATS_RTOL, atol=0)
    torch.testing.assert_close(out["cuda"][1][1, slots], vsum, rtol=STATS_RTOL, atol=0)
    unused = sorted(set(range(n + 2)) - set(slots))
    assert (out["cuda"][1][:, unused] == -1).all()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stats_of_a_skipped_step_are_not_written_cuda(optimizer):
    base = _stats_inputs(torch.float32, False)
    lists = {k: [t.to(DEV) for t in v] for k, v in base.items()}
    n = len(STATS_SHAPES)
    stats = torch.full((2, n), -1.0, dtype=torch.float64, device=DEV)
    skip = dict(found_inf=torch.ones((), device=DEV), grad_scale=torch.full((), 8.0, device=DEV))
    kw = dict(stats=stats, stat_slots=list(range(n)), wd_tensor=torch.tensor(0.1, device=DEV))
    if optimizer == "adam":
        ops.adam_(lists["params"], lists["grads"], lists["m"], lists["v"], [], lists["steps"], [], [], **kw,
                  **adam_hyper(weight_decay=1.0, decay_mode=1, **skip))
    else:
        ops.sgd_(lists["params"], lists["grads"], lists["m"], [False] * n, [], [], [], **kw,
                 **sgd_hyper(momentum=0.9, weight_decay=1.0, **skip))
    assert (stats.cpu() == -1).all()
    for k, v in base.items():
        for x, y in zip(v, lists[k]):
            assert torch.equal(y.cpu(), x), k


def test_cpu_wd_tensor_for_cuda_params():
    """A CPU wd_tensor is read on the host (like a CPU lr_tensor): the same
    bits as a device one."""
    base = _stats_inputs(torch.float32, False)
    res = []
    for wd in (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64, device=DEV)):
        lists = {k: [t.to(DEV) for t in v] for k, v in base.items()}
        _stats_call(ops, lists, "adam", False, None, [], wd)
        res.append(lists["params"])
    assert_bitwise(res[1], [p.cpu() for p in res[0]], "params")


AUTO_PREP_CUDA = {
    "plain": {},
    "scaled": dict(grad_scale=1024.0, found_inf=0.0),
    "found_inf": dict(grad_scale=1024.0, found_inf=1.0),
    "clip": dict(grad_norm=3.5, max_norm=1.0),
    "nonfinite_norm": dict(grad_norm=math.inf, max_norm=1.0),
}


@pytest.mark.parametrize("prep", list(AUTO_PREP_CUDA))
@pytest.mark.parametrize("mode", [0, 1], ids=["scheduled", "adaptive"])
def test_auto_decay_matches_cpu(mode, prep):
    g = torch.Generator().manual_seed(32)
    n = 9
    ins = [torch.rand(2, n, generator=g, dtype=torch.float64) * 10,
           torch.rand(n, generator=g, dtype=torch.float64) * 5e3,
           torch.randint(0, 50, (n,), generator=g).double(),
           torch.randint(1, 1000, (n,), generator=g).double()]
    res = {}
    for dev in ("cpu", DEV):
        kw = dict(grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True)
        for k, v in AUTO_PREP_CUDA[prep].items():
            kw[k] = v if k == "max_norm" else torch.tensor(v, device=dev)
        state = torch.tensor([0.25], dtype=torch.float64, device=dev)
        vals = [ops.auto_decay(*[t.to(dev) for t in ins], state, mode=mode, weight_decay=0.05, beta2=0.999,
                               eps=1e-8, **kw) for _ in range(2)]
        assert all(v.device.type == torch.device(dev).type and v.dtype == torch.float64 and v.dim() == 0
                   for v in vals)
        res[dev] = (torch.stack(vals).cpu(), state.cpu())
    # pow() of glibc and of CUDA may differ in the last bit
    torch.testing.assert_close(res[DEV][0], res["cpu"][0], **FP64_LAST_BITS)
    torch.testing.assert_close(res[DEV][1], res["cpu"][1], **FP64_LAST_BITS)


def test_stats_wd_tensor_and_auto_decay_do_not_sync():
    base = _stats_inputs(torch.float32, False)
    lists = {k: [t.to(DEV) for t in v] for k, v in base.items()}
    n = len(STATS_SHAPES)
    stats = torch.zeros((2, n), dtype=torch.float64, device=DEV)
    gsq = torch.ones(n, dtype=torch.float64, device=DEV)
    steps = torch.full((n,), 3.0, dtype=torch.float64, device=DEV)
    numels = torch.tensor([float(max(t.numel(), 1)) for t in base["params"]], dtype=torch.float64, device=DEV)
    state = torch.zeros(1, dtype=torch.float64, device=DEV)
    scale, found = torch.full((), 8.0, device=DEV), torch.zeros((), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in (0, 1):
            wd = ops.auto_decay(stats, gsq, steps, numels, state, mode=mode, weight_decay=0.1, beta2=0.999,
                                eps=1e-8, grad_norm=None, max_norm=0.0, grad_scale=scale, found_inf=found,
                                skip_nonfinite=True)
            ops.adam_(lists["params"], lists["grads"], lists["m"], lists["v"], [], lists["steps"], [], [],
                      stats=stats, stat_slots=list(range(n)), wd_tensor=wd,
                      **adam_hyper(weight_decay=1.0, decay_mode=1, grad_scale=scale, found_inf=found))
            ops.sgd_(lists["params"], lists["grads"], lists["m"], [False] * n, [], [], [], stats=stats,
                     stat_slots=list(range(n)), wd_tensor=wd, **sgd_hyper(momentum=0.9, weight_decay=1.0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(stats).all() and (stats[0, [0, 1, 2, 4, 5, 6]] > 0).all()


def test_stats_wd_tensor_and_auto_decay_under_graph_capture():
    """auto_decay feeding adam_'s wd_tensor, with statistics, captured in a
    CUDA graph: each replay reads the statistics the last one wrote, like
    the eager steps."""
    base = _stats_inputs(torch.float32, False)
    n = len(STATS_SHAPES)
    numels = torch.tensor([float(t.numel()) for t in base["params"]], dtype=torch.float64, device=DEV)

    def make():
        lists = {k: [t.to(DEV, copy=True) for t in v] for k, v in base.items()}
        stats = torch.ones((2, n), dtype=torch.float64, device=DEV)
        return lists, stats, torch.zeros(1, dtype=torch.float64, device=DEV)

    def step(lists, stats, state):
        gsq = torch.stack([g.double().pow(2).sum() for g in lists["grads"]])
        steps = torch.cat([s.double().reshape(1) for s in lists["steps"]])
        wd = ops.auto_decay(stats, gsq, steps, numels, state, mode=1, weight_decay=0.5, beta2=0.999, eps=1e-8,
                            grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None,
                            skip_nonfinite=True)
        ops.adam_(lists["params"], lists["grads"], lists["m"], lists["v"], [], lists["steps"], [], [],
                  stats=stats, stat_slots=list(range(n)), wd_tensor=wd,
                  **adam_hyper(lr=0.05, weight_decay=1.0, decay_mode=1))

    eager, captured = make(), make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*eager)
        step(*captured)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*captured)
    for _ in range(3):
        graph.replay()
        step(*eager)
    torch.cuda.synchronize()
    assert torch.equal(captured[1], eager[1]) and torch.equal(captured[2], eager[2])
    for k in base:
        for x, y in zip(eager[0][k], captured[0][k]):
            assert torch.equal(x, y), k
