"""CUDA backend of fused_wd: parity with torch.optim on the GPU, the
multi-tensor apply edge cases (thousands of tensors, misaligned views, a
tensor past 2^31 elements), determinism, no host sync, CUDA graph capture,
GradScaler, mixed dtypes, several GPUs, and opcheck. Every test is skipped
when no CUDA device is present."""
import copy
import math

import pytest
import torch

import fused_wd

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")

DEV = "cuda"
ops = torch.ops.fused_wd

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# A few units of the dtype's rounding after several steps: a wrong formula
# (missing bias correction, decay in the wrong place, unclipped gradient)
# fails by orders of magnitude.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
# The global norm is float32 by contract: fp64 with clipping agrees to that.
FP64_CLIPPED = dict(rtol=1e-6, atol=1e-8)

# a 0-dim param, an empty one, one crossing a chunk boundary (16384)
SHAPES = [(37, 19), (5,), (), (0,), (3, 4, 5), (16385,)]
NONE_GRAD = {1: (1, 3)}  # param 1 has no grad on steps 1 and 3
CLIPS = [None, (0.5, 2.0), (0.05, math.inf)]


# torch.nn.utils.clip_grad_norm_ rounds the clipped fp16/bf16 grads to their
# dtype, fused_wd clips in fp32 inside the kernel: gradients near eps then
# differ by a few units of fp16 rounding after Adam's normalization.
LOWP_CLIPPED = {torch.float16: dict(rtol=2e-3, atol=1e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3)}


def tol_for(dtype, clipped=False):
    if clipped and dtype == torch.float64:
        return FP64_CLIPPED
    if clipped and dtype in LOWP_CLIPPED:
        return LOWP_CLIPPED[dtype]
    return TOL[dtype]


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


def assert_mostly_close(actual, expected, rtol, atol, what="", outliers=0.005, factor=100.0):
    """assert_close, except that a few isolated elements (at most `outliers`
    of them, at least 2) may differ by up to `factor` times the tolerance:
    two correct implementations that round differently (torch uses FMA, and
    stores clipped fp16/bf16 grads) disagree more where a sum cancels (a
    momentum buffer or an L2-decayed grad near zero, amplified by Adam's
    normalization). A wrong formula moves nearly every element."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    same_nan = torch.isnan(a) & torch.isnan(e)
    err = torch.where(same_nan, torch.zeros_like(a), (a - e).abs())
    err = torch.nan_to_num(err, nan=math.inf)
    bound = atol + rtol * e.abs()
    bad = err > bound
    nbad = int(bad.sum())
    allowed = max(2, int(outliers * actual.numel()))
    worst = float((err / bound).max())
    assert nbad <= allowed and worst <= factor, (
        f"{what}: {nbad} of {actual.numel()} elements beyond rtol={rtol}, atol={atol} "
        f"(allowed {allowed}); worst error is {worst:.3g} x the tolerance (allowed {factor})")


def assert_same(a, b, oa, ob, tol, strict=False):
    """Params of a and b, and every state tensor of oa and ob, agree."""
    for i, (x, y) in enumerate(zip(a, b)):
        if strict:
            torch.testing.assert_close(y.detach(), x.detach(), **tol)
        else:
            assert_mostly_close(y, x, what=f"param {i}", **tol)
    for x, y in zip(a, b):
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k, va in sa.items():
            vb = sb[k]
            if va is None:
                assert vb is None, k
                continue
            assert vb.shape == va.shape and vb.dtype == va.dtype, (k, vb.shape, va.shape, vb.dtype, va.dtype)
            if strict:
                torch.testing.assert_close(vb.cpu(), va.cpu(), **tol, msg=lambda m, k=k: f"state {k}: {m}")
            else:
                assert_mostly_close(vb, va, what=f"state {k}", **tol)


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
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad,
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
@pytest.mark.parametrize("mode", ["l2", "decoupled", "independent"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_weight_decay_modes_match_reference(name, mode, dtype):
    fcls = getattr(fused_wd, name)
    rcls = getattr(fused_wd.reference, name)
    hp = dict(lr=0.01, weight_decay=0.1, weight_decay_mode=mode, max_grad_norm=0.5)
    if name == "SGD":
        hp["momentum"] = 0.9
    a, b, oa, ob = run_pair(lambda p: rcls(p, **hp), lambda p: fcls(p, **hp), dtype, clip_a=False)
    assert_same(a, b, oa, ob, tol_for(dtype, True))
    torch.testing.assert_close(ob.last_grad_norm, oa.last_grad_norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_cpu_backend(dtype):
    """The same adam_/sgd_ call on CUDA and on the CPU gives the same values
    (same math.h; fp contraction is off on both)."""
    shapes = [(1000,), (17, 3), (), (16384 * 2 + 5,)]
    ps = host_params(dtype, shapes)
    gs = host_grads(shapes, 0, dtype=dtype)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else TOL[dtype]
    if dtype == torch.float64:
        tol = dict(rtol=1e-13, atol=1e-14)
    results = {}
    for dev in ("cpu", DEV):
        p = [x.clone().to(dev) for x in ps]
        g = [x.clone().to(dev) for x in gs]
        m = [torch.randn_like(x, dtype=torch.float64).abs().to(dtype).to(dev) for x in ps]
        v = [torch.rand_like(x, dtype=torch.float64).to(dtype).to(dev) for x in ps]
        vm = [x.clone() for x in v]
        steps = [torch.tensor(3.0, device=dev) for _ in ps]
        norm = torch.tensor(7.5, device=dev)
        scale = torch.tensor(3.0, device=dev)
        ops.adam_(p, g, m, v, vm, steps, 0.01, None, 0.9, 0.99, 1e-8, 0.1, 1, 0.01, True, False,
                  norm, 1.0, scale, None, True, [])
        b = [torch.randn_like(x, dtype=torch.float64).to(dtype).to(dev) for x in ps]
        p2 = [x.clone() for x in p]
        ops.sgd_(p2, g, b, [False, True, False, True], 0.01, None, 0.9, 0.1, False, 0.1, 0, 0.01,
                 True, norm, 1.0, scale, None, True, [], [])
        results[dev] = (p, m, v, vm, steps, b, p2)
    for xs, ys in zip(results["cpu"], results[DEV]):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y.cpu(), x, **tol)


# ------------------------------------------------------------- op semantics


def _adam_args(n=3, dtype=torch.float32, **over):
    shapes = [(100,), (7, 9), ()][:n]
    p = [x.to(DEV) for x in host_params(dtype, shapes)]
    g = [x.to(DEV) for x in host_grads(shapes, 0, dtype=dtype)]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    steps = [torch.zeros((), device=DEV) for _ in p]
    kw = dict(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=[], state_steps=steps,
              lr=1e-2, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decay_mode=1, initial_lr=1e-2, amsgrad=False, maximize=False, grad_norm=None,
              max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
              master_params=[])
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
        assert_mostly_close(torch.cat([p.detach() for p in y]), torch.cat([p.detach() for p in x]),
                            what="params", **TOL[torch.float32])
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
        assert_mostly_close(p[s:e], x, what=f"param [{s}, {e})", **TOL[dt])
        assert_mostly_close(st["exp_avg"][s:e], ref.state[x]["exp_avg"], what="exp_avg", **TOL[dt])
        assert_mostly_close(st["exp_avg_sq"][s:e], ref.state[x]["exp_avg_sq"], what="exp_avg_sq", **TOL[dt])
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


# ------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("clip", [False, True])
def test_grad_scaler_fp16_autocast(clip):
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
        for model, opt, sc, ours in ((model_t, opt_t, sc_t, False), (model_f, opt_f, sc_f, True)):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().pow(2).mean()
            sc.scale(loss).backward()
            if step == 3:  # an overflow: both skip the step and lower the scale
                model[0].weight.grad[0, 0] = math.inf
            if clip and not ours:
                sc.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            sc.step(opt)
            sc.update()
            opt.zero_grad(set_to_none=True)
        assert sc_t.get_scale() == sc_f.get_scale()
        assert_same(list(model_t.parameters()), list(model_f.parameters()), opt_t, opt_f,
                    dict(rtol=1e-4, atol=1e-5))
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
        assert_mostly_close(y, x, what=str(x.dtype), **tol_for(x.dtype, True))


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
    torch.library.opcheck(ops.adam_.default, (
        p, g, z(), z(), z(), steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, 1, 1e-3, True, False,
        norm, 1.0, scale, found, True, []))
    torch.library.opcheck(ops.adam_.default, (
        p, g, z(), z(), [], steps, 0.0, torch.tensor(1e-3, device=DEV), 0.9, 0.999, 1e-8, 0.01, 0,
        1e-3, False, True, None, 0.0, None, None, True, []))
    torch.library.opcheck(ops.sgd_.default, (
        p, g, z(), [True, False, True], 1e-2, None, 0.9, 0.0, True, 0.01, 0, 1e-2, False,
        norm, 1.0, scale, found, True, [], []))
    torch.library.opcheck(ops.sgd_.default, (
        p, g, [], [], 1e-2, None, 0.0, 0.0, False, 0.0, 0, 1e-2, False, None, 0.0, None, None, False, [], []))


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
