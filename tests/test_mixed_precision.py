"""Mixed precision (issue 6): fp32 master weights, bf16/fp32 optimizer state
and stochastic rounding, on the CPU and (skipped without one) CUDA.

Tolerances, and why:
- master weights vs torch.optim on an fp32 copy fed the same (bf16/fp16)
  grads: the master IS that fp32 run, so fp32 rounding (conftest TOL) over
  20 steps, and the param is exactly the master rounded to nearest;
- bf16 + master vs an fp32 model over 300 steps of a small MLP: final loss
  within 5% relative and params within 2e-2 absolute (a bf16 forward/backward
  differs from fp32 by ~1e-2 relative per step; the master keeps the updates);
- state_dtype=bf16 vs fp32 states: final loss within 5% relative;
- stochastic rounding of 8192 bf16 weights under 1000 updates of 1/80 ulp:
  mean drift within 0.01 of the fp32 drift (0.1), about 5 sigma of the
  rounding noise of the mean; round-to-nearest does not move at all.
"""
import copy
import math

import pytest
import torch

import fused_wd
from fused_wd import reference

from conftest import DEVICES, TOL, adam_hyper, sgd_hyper

LOW = [torch.bfloat16, torch.float16]


def _mlp(dtype, device, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return m.to(device=device, dtype=dtype)


def _data(device, n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return x.to(device), y.to(device)


def _train(model, opt, steps, device, dtype):
    x, y = _data(device)
    losses = []
    for i in range(steps):
        idx = slice((i * 32) % 256, (i * 32) % 256 + 32)
        opt.zero_grad()
        loss = ((model(x[idx].to(dtype)).float() - y[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        full = ((model(x.to(dtype)).float() - y) ** 2).mean().item()
    return losses, full


# ------------------------------------------------------------ master weights

def _opts(kind, params, **kw):
    if kind == "adamw":
        return (fused_wd.AdamW(params, lr=1e-2, weight_decay=0.1, **kw),
                lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))
    if kind == "adam_amsgrad":
        # L2 decay left out: with bf16 data g + wd*p can cancel to ~1e-11, where
        # torch's add(alpha=) and the kernel's g + wd*p differ in the last bit
        # and Adam's tiny denominator amplifies that (the fp32 path does too)
        return (fused_wd.Adam(params, lr=1e-2, amsgrad=True, **kw),
                lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=False))
    return (fused_wd.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, **kw),
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1,
                                       foreach=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", ["adamw", "adam_amsgrad", "sgd"])
def test_master_is_fp32_training_on_low_precision_grads(kind, dtype, device):
    """The master follows torch.optim on an fp32 copy fed the same grads; the
    param is the master rounded to nearest, written in the same pass."""
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 19), (5,), (), (3, 4, 5), (70000,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    params = [t.to(dtype).to(device).requires_grad_() for t in init]
    opt, make_torch = _opts(kind, params, master_weights=True)
    ref = [p.detach().float().clone().requires_grad_() for p in params]
    topt = make_torch(ref)
    for step in range(20):
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g).to(dtype).to(device)
            r.grad = p.grad.float()
        opt.step()
        topt.step()
    for p, r in zip(params, ref):
        st = opt.state[p]
        master = st[fused_wd.optim.MASTER_KEY]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, r.detach(), **TOL[torch.float32])
        assert torch.equal(p.detach(), master.to(dtype))
        for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if k in st:
                assert st[k].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_master_weights_track_fp32_training(device):
    """bf16 params + fp32 master vs the same model in fp32, 300 steps."""
    steps = 300
    m32 = _mlp(torch.float32, device)
    init = {k: v.to(torch.bfloat16) for k, v in m32.state_dict().items()}
    mlo = _mlp(torch.bfloat16, device)
    mlo.load_state_dict(init)
    l32, f32 = _train(m32, fused_wd.AdamW(m32.parameters(), lr=3e-3), steps, device, torch.float32)
    opt = fused_wd.AdamW(mlo.parameters(), lr=3e-3, master_weights=True)
    _, flo = _train(mlo, opt, steps, device, torch.bfloat16)
    assert f32 < 0.5 * l32[0]  # it trained
    assert abs(flo - f32) <= 0.05 * f32, (flo, f32)
    for p32, plo in zip(m32.parameters(), mlo.parameters()):
        torch.testing.assert_close(opt.state[plo]["master_param"], p32.detach(), rtol=0, atol=2e-2)
    # without the master, bf16 round-to-nearest loses small updates: a worse fit
    mrn = _mlp(torch.bfloat16, device)
    mrn.load_state_dict(init)
    _, frn = _train(mrn, fused_wd.AdamW(mrn.parameters(), lr=3e-3), steps, device, torch.bfloat16)
    assert abs(flo - f32) <= abs(frn - f32) + 1e-3, (flo, frn, f32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=str)
def test_master_and_state_dtype_match_reference(kind, state_dtype, device):
    """The kernels against fused_wd.reference (spelled-out torch math) for
    master weights with fp32 or bf16 states, and bf16 states alone."""
    g = torch.Generator().manual_seed(3)
    shapes = [(37, 19), (5,), (3, 4, 5)]
    init = [torch.randn(s, generator=g).to(torch.bfloat16).to(device) for s in shapes]
    for master in (True, False):
        a = [t.clone().requires_grad_() for t in init]
        b = [t.clone().requires_grad_() for t in init]
        kw = dict(master_weights=master, state_dtype=state_dtype)
        if kind == "adamw":
            oa = fused_wd.AdamW(a, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, **kw)
            ob = reference.AdamW(b, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, **kw)
        else:
            oa = fused_wd.SGD(a, lr=1e-2, momentum=0.9, weight_decay=0.1, max_grad_norm=1.0, **kw)
            ob = reference.SGD(b, lr=1e-2, momentum=0.9, weight_decay=0.1, max_grad_norm=1.0, **kw)
        for _ in range(10):
            for x, y in zip(a, b):
                x.grad = torch.randn(x.shape, generator=g).to(torch.bfloat16).to(device)
                y.grad = x.grad.clone()
            oa.step()
            ob.step()
        for x, y in zip(a, b):
            sa, sb = oa.state[x], ob.state[y]
            assert sa.keys() == sb.keys()
            for k in sa:
                assert sa[k].dtype == sb[k].dtype, k
                torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.float(), y.float(), rtol=8e-3, atol=1e-5)
            want = torch.float32 if state_dtype is None and master else (state_dtype or torch.bfloat16)
            assert sa["exp_avg" if kind == "adamw" else "momentum_buffer"].dtype == want


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_states_stay_close_to_fp32_states(device):
    steps = 300
    ma, mb = _mlp(torch.float32, device), _mlp(torch.float32, device)
    _, fa = _train(ma, fused_wd.AdamW(ma.parameters(), lr=3e-3), steps, device, torch.float32)
    ob = fused_wd.AdamW(mb.parameters(), lr=3e-3, state_dtype=torch.bfloat16)
    _, fb = _train(mb, ob, steps, device, torch.float32)
    assert ob.state[next(mb.parameters())]["exp_avg_sq"].dtype == torch.bfloat16
    assert abs(fa - fb) <= 0.05 * fa, (fa, fb)


# ------------------------------------------------------------ state_dict

def _steps(model, opt, n, device, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 16, generator=g).to(device=device, dtype=dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [fused_wd, reference], ids=["fused_wd", "reference"])
def test_state_dict_round_trip_keeps_fp32_master(impl, device):
    m = _mlp(torch.bfloat16, device)
    opt = impl.AdamW(m.parameters(), lr=1e-2, master_weights=True)
    _steps(m, opt, 3, device, torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())
    assert all(s["master_param"].dtype == torch.float32 for s in sd["state"].values())
    m2 = copy.deepcopy(m)
    opt2 = impl.AdamW(m2.parameters(), lr=1e-2, master_weights=True)
    opt2.load_state_dict(sd)
    for p, q in zip(m.parameters(), m2.parameters()):
        for k, v in opt.state[p].items():
            assert opt2.state[q][k].dtype == v.dtype, k  # torch would have cast to bf16
            assert torch.equal(opt2.state[q][k], v), k
    _steps(m, opt, 3, device, torch.bfloat16, seed=9)
    _steps(m2, opt2, 3, device, torch.bfloat16, seed=9)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_checkpoint_without_master_initializes_it(device):
    m = _mlp(torch.bfloat16, device)
    topt = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False)
    _steps(m, topt, 3, device, torch.bfloat16)
    opt = fused_wd.AdamW(m.parameters(), lr=0.0, weight_decay=0.0, master_weights=True)
    opt.load_state_dict(topt.state_dict())
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    _steps(m, opt, 1, device, torch.bfloat16)
    for p, b in zip(m.parameters(), before):
        st = opt.state[p]
        assert torch.equal(st["master_param"], b.float())  # lr 0: the master is the param
        assert st["exp_avg"].dtype == torch.float32 and st["step"].item() == 4
        assert torch.equal(p, b)
    # and back: torch.optim loads a checkpoint with a master (it ignores the key)
    torch.optim.AdamW(m.parameters()).load_state_dict(opt.state_dict())


# ------------------------------------------------------------ AMP + clipping

def _scaler_unscales(dtype, device):
    """Whether torch's GradScaler can unscale grads of `dtype` on `device`
    (torch 2.11's CUDA kernel takes no bfloat16)."""
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(
            [torch.ones(1, dtype=dtype, device=device)], torch.zeros(1, device=device),
            torch.ones(1, device=device))
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_and_clipping_with_master(device, dtype):
    if not _scaler_unscales(dtype, device):
        pytest.skip(f"torch {torch.__version__}'s GradScaler cannot unscale {dtype} grads on {device}")
    ma = _mlp(dtype, device)
    mb = copy.deepcopy(ma)
    kw = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, master_weights=True)
    oa, ob = fused_wd.AdamW(ma.parameters(), **kw), reference.AdamW(mb.parameters(), **kw)
    sa = torch.amp.GradScaler(device, init_scale=1024.0)
    sb = torch.amp.GradScaler(device, init_scale=1024.0)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        x = torch.randn(8, 16, generator=g).to(device=device, dtype=dtype)
        if i == 3:
            x[0, 0] = math.inf  # an overflow: both skip the step
        for m, o, s in ((ma, oa, sa), (mb, ob, sb)):
            o.zero_grad()
            s.scale(m(x).float().pow(2).mean()).backward()
            s.step(o)
            s.update()
    assert sa.get_scale() == sb.get_scale() < 1024.0
    torch.testing.assert_close(oa.last_grad_norm, ob.last_grad_norm, rtol=1e-5, atol=0)
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert oa.state[p]["step"].item() == 5
        torch.testing.assert_close(oa.state[p]["master_param"], ob.state[q]["master_param"],
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ stochastic rounding

def _sr_drift(device, sr, steps=1000, n=8192, lr=1e-4):
    w = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
    opt = fused_wd.SGD([w], lr=lr, stochastic_rounding=sr, sr_seed=123)
    w.grad = torch.ones_like(w)
    for _ in range(steps):
        opt.step()
    return w.detach().float()


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_moves_below_half_ulp(device):
    # bf16 ulp at 1.0 is 2^-7 = 0.0078; each update is 1e-4 (1/78 ulp)
    expected = 1.0 - 1000 * 1e-4  # the fp32 result, 0.9
    rtn = _sr_drift(device, False)
    assert torch.all(rtn == 1.0)  # round-to-nearest stalls
    sr = _sr_drift(device, True)
    assert abs(sr.mean().item() - expected) < 0.01, sr.mean().item()
    assert sr.std().item() > 0  # elements take different roundings


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_stochastic_rounding_bitwise_reproducible_and_resumable(kind, device):
    def make(seed=7):
        m = _mlp(torch.bfloat16, device)
        if kind == "adamw":
            o = fused_wd.AdamW(m.parameters(), lr=1e-3, stochastic_rounding=True, sr_seed=seed)
        else:
            o = fused_wd.SGD(m.parameters(), lr=1e-2, momentum=0.9, stochastic_rounding=True,
                             sr_seed=seed)
        return m, o

    m1, o1 = make()
    _steps(m1, o1, 4, device, torch.bfloat16)
    sd, params = copy.deepcopy(o1.state_dict()), copy.deepcopy(m1.state_dict())
    _steps(m1, o1, 4, device, torch.bfloat16, seed=6)

    m2, o2 = make()  # the same run again
    _steps(m2, o2, 4, device, torch.bfloat16)
    _steps(m2, o2, 4, device, torch.bfloat16, seed=6)

    m3, o3 = make(seed=999)  # resumed: the seed comes from the checkpoint
    m3.load_state_dict(params)
    o3.load_state_dict(sd)
    assert o3.param_groups[0]["sr_seed"] == 7
    _steps(m3, o3, 4, device, torch.bfloat16, seed=6)

    m4, o4 = make(seed=8)  # another seed rounds differently
    _steps(m4, o4, 8, device, torch.bfloat16)
    for a, b, c, d in zip(m1.parameters(), m2.parameters(), m3.parameters(), m4.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(not torch.equal(a, d) for a, d in zip(m1.parameters(), m4.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_stochastic_rounding_matches_reference(kind, device):
    """The kernels' stochastic rounding against fused_wd.reference, which
    draws the same counter-based bits with torch integer ops (keyed by seed,
    param index, step and the element's place in memory): the same bits on
    the CPU, one ulp at most on a GPU (whose fp32 math may differ in the last
    bit); contiguous, channels_last, sliced and 0-dim bf16 params."""
    g = torch.Generator().manual_seed(4)
    big = torch.randn(6, 9, generator=g).bfloat16()
    init = [torch.randn(37, 19, generator=g).bfloat16(), torch.randn((), generator=g).bfloat16(),
            torch.randn(4, 6, 5, 3, generator=g).bfloat16().to(memory_format=torch.channels_last)]

    def run(impl, sr=True):
        ps = [t.to(device).clone().requires_grad_() for t in init]
        ps.append(big.to(device, copy=True)[::2].requires_grad_())  # a view with gaps
        if kind == "adamw":
            opt = impl.AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                             stochastic_rounding=sr, sr_seed=5)
        else:
            opt = impl.SGD(ps, lr=5e-2, momentum=0.9, stochastic_rounding=sr, sr_seed=5)
        gg = torch.Generator().manual_seed(6)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg).bfloat16().to(device)
                p.grad = p.grad.to(memory_format=torch.channels_last) if p.dim() == 4 else p.grad
            opt.step()
        return [p.detach().float().cpu() for p in ps]

    fused, ref, nearest = run(fused_wd), run(reference), run(fused_wd, sr=False)
    assert any(not torch.equal(a, b) for a, b in zip(fused, nearest))  # it rounded stochastically
    for a, b in zip(fused, ref):
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=8e-3, atol=1e-6)
            assert (a != b).float().mean() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_stochastic_rounding_same_bits_on_cpu_and_cuda():
    out = {}
    for dev in ("cpu", "cuda"):
        m = _mlp(torch.bfloat16, dev)
        o = fused_wd.AdamW(m.parameters(), lr=1e-3, stochastic_rounding=True, sr_seed=1)
        _steps(m, o, 3, dev, torch.bfloat16)
        out[dev] = [p.detach().cpu() for p in m.parameters()]
    for a, b in zip(out["cpu"], out["cuda"]):
        # same RNG bits; the fp32 math may differ in the last bit on the GPU
        torch.testing.assert_close(a.float(), b.float(), rtol=8e-3, atol=1e-6)


# ------------------------------------------------------------ ops

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed(device):
    ops = torch.ops.fused_wd
    ps = [torch.randn(5, 3, device=device).bfloat16(), torch.randn(4, device=device).bfloat16()]
    gs = [torch.randn_like(p) for p in ps]
    z32 = lambda: [torch.zeros_like(p, dtype=torch.float32) for p in ps]  # noqa: E731
    zb = lambda: [torch.zeros_like(p) for p in ps]  # noqa: E731
    steps = lambda: [torch.zeros((), device=device) for _ in ps]  # noqa: E731
    masters = lambda: [p.float() for p in ps]  # noqa: E731
    norm = torch.tensor(3.0, device=device)
    torch.library.opcheck(ops.adam_.default, (
        [p.clone() for p in ps], gs, z32(), z32(), z32(), steps(), masters(), []),
        adam_hyper(weight_decay=0.1, decay_mode=1, amsgrad=True, grad_norm=norm, max_norm=1.0))
    torch.library.opcheck(ops.adam_.default, (
        [p.clone() for p in ps], gs, zb(), zb(), [], steps(), [], [0, 1]),
        adam_hyper(weight_decay=0.1, decay_mode=1, stochastic_rounding=True, sr_seed=5))
    torch.library.opcheck(ops.sgd_.default, (
        [p.clone() for p in ps], gs, z32(), [True, False], masters(), [], []),
        sgd_hyper(momentum=0.9, nesterov=True, weight_decay=0.1, grad_norm=norm, max_norm=1.0))
    torch.library.opcheck(ops.sgd_.default, (
        [p.clone() for p in ps], gs, [], [], [], steps(), [0, 1]),
        sgd_hyper(stochastic_rounding=True, sr_seed=5))


def test_mixed_options_are_checked():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fused_wd.AdamW([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="master_weights"):
        fused_wd.SGD([p], master_weights=1)
    ops = torch.ops.fused_wd
    with pytest.raises(RuntimeError, match="master weights are float32"):
        ops.sgd_([p.detach()], [p.detach()], [], [], [torch.zeros(3, dtype=torch.float16)], [], [],
                 **sgd_hyper())
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.adam_([p.detach()], [p.detach()], [torch.zeros(3)], [torch.zeros(3).bfloat16()], [],
                  [torch.zeros(())], [], [], **adam_hyper())
    with pytest.raises(RuntimeError, match="sr_ids"):
        ops.adam_([p.detach()], [p.detach()], [torch.zeros(3)], [torch.zeros(3)], [],
                  [torch.zeros(())], [], [], **adam_hyper(stochastic_rounding=True, sr_seed=1))


def test_fp32_params_in_a_master_group_have_no_master():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_wd.AdamW([a, b], lr=1e-2, master_weights=True)
    a.grad, b.grad = torch.ones(3), torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    assert "master_param" not in opt.state[a] and "master_param" in opt.state[b]
    assert opt.state[a]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(a.detach(), opt.state[b]["master_param"])
