"""The statistics the update pass writes as by-products, and the automatic
weight decays built on them (docs/weight-decay.md, "Automatic weight
decay"), checked against their equations written out here in float64 plain
PyTorch (from the optimizer's state before each step):

  scheduled (SWD):  p <- p - lr * wd * p / (sqrt(v_bar) + eps) - lr * u
                    v_bar = mean over every element of every updated param
                            of v_t / (1 - beta2^t), each with its own t
  adaptive (AWD):   lam = wd * |g| / |p|   (g unscaled, before clipping;
                                             p before the step; global norms)
                    lam_bar <- 0.1 * lam_bar + 0.9 * lam
                    p <- p * (1 - lr * lam_bar) - lr * u

u is the step direction: Adam's m_hat / (sqrt(v_hat) + eps), SGD's momentum
direction. last_weight_norm is the global 2-norm of the params after the
step, from the pass's sums of p^2.
"""
import copy
import importlib.util
import os
import zlib
from unittest import mock

import pytest
import torch

import fused_wd
from conftest import DEVICES, TOL, tol_for

SHAPES = [(23, 17), (40,), (), (3, 4, 5)]
LR0 = 0.05
WD = 0.5
GRAD_SCALE = 0.1   # grads ~0.1: v_hat ~ 0.01, so SWD's strength is ~10 wd, AWD's ~0.1 wd
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _f64(t):
    return t.detach().to("cpu", torch.float64)


def _weight(opt, p):
    """The value the optimizer updates: the fp32 master when p has one."""
    mp = opt.state.get(p, {}).get("master_param")
    return p if mp is None else mp


# ------------------------------------------------------------ the equations

def adam_direction(g, st, b1, b2, eps, t):
    m = b1 * st["exp_avg"] + (1 - b1) * g
    v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    u = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
    return u, dict(exp_avg=m, exp_avg_sq=v)


def sgd_direction(g, st, momentum):
    if not momentum:
        return g, {}
    buf = g if st.get("momentum_buffer") is None else momentum * st["momentum_buffer"] + g
    return buf, dict(momentum_buffer=buf)


def strength(mode, before, grads, coef, hp, lam_bar):
    """The decay strength (what multiplies lr * p) of this step, and AWD's
    new lam_bar. `before`: per updated param (p, state, t) in float64."""
    if mode == "scheduled":
        b2 = hp["betas"][1]
        total = sum(((b2 * st["exp_avg_sq"] + (1 - b2) * (coef * g) ** 2) / (1 - b2 ** t)).sum()
                    for (_, st, t), g in zip(before, grads))
        count = sum(g.numel() for g in grads)
        return WD / (torch.sqrt(total / count) + hp["eps"]), lam_bar
    gnorm = torch.sqrt(sum((g * g).sum() for g in grads))
    pnorm = torch.sqrt(sum((p * p).sum() for p, _, _ in before))
    lam_bar = 0.1 * lam_bar + 0.9 * WD * gnorm / pnorm
    return lam_bar, lam_bar


CASES = {
    "Adam-scheduled": ("Adam", "scheduled", {}),
    "AdamW-scheduled": ("AdamW", "scheduled", {}),
    "AdamW-scheduled-maximize": ("AdamW", "scheduled", dict(maximize=True)),
    "Adam-adaptive": ("Adam", "adaptive", {}),
    "AdamW-adaptive-amsgrad": ("AdamW", "adaptive", dict(amsgrad=True)),
    "SGD-adaptive": ("SGD", "adaptive", {}),
    "SGD-adaptive-momentum": ("SGD", "adaptive", dict(momentum=0.9)),
}


def _expected(name, mode, extra, opt, params, grads64, coef, lr):
    """Per updated param: the expected (weight, state) after the step, and
    the expected lam_bar; plus what plain decoupled decay at WD would give
    (the variant a kernel that ignored the strength would run)."""
    group = opt.param_groups[0]
    lam_bar = _f64(group["adaptive_decay"]).reshape(()) if "adaptive_decay" in group else torch.zeros((), dtype=torch.float64)
    upd = [i for i, g in enumerate(grads64) if g is not None]
    before = []
    for i in upd:
        p = params[i]
        st = {k: _f64(v) for k, v in opt.state.get(p, {}).items() if k in STATE_KEYS}
        if name != "SGD":
            for k in ("exp_avg", "exp_avg_sq"):
                st.setdefault(k, torch.zeros(p.shape, dtype=torch.float64))
        step = opt.state.get(p, {}).get("step")
        t = (0.0 if step is None else float(step)) + 1
        before.append((_f64(_weight(opt, p)), st, t))
    gs = [grads64[i] for i in upd]
    s, lam_new = strength(mode, before, gs, coef, dict(betas=(0.9, 0.999), eps=1e-8), lam_bar)
    want, plain = {}, {}
    for i, (p0, st, t), g in zip(upd, before, gs):
        gu = coef * (-g if extra.get("maximize") else g)
        if name == "SGD":
            u, new_st = sgd_direction(gu, st, extra.get("momentum", 0.0))
        else:
            if extra.get("amsgrad"):
                b2 = 0.999
                vmax = torch.maximum(_f64(opt.state[params[i]]["max_exp_avg_sq"]) if "max_exp_avg_sq" in
                                     opt.state.get(params[i], {}) else torch.zeros_like(p0),
                                     b2 * st["exp_avg_sq"] + (1 - b2) * gu * gu)
                m = 0.9 * st["exp_avg"] + 0.1 * gu
                u = (m / (1 - 0.9 ** t)) / (torch.sqrt(vmax / (1 - b2 ** t)) + 1e-8)
                new_st = dict(exp_avg=m, exp_avg_sq=b2 * st["exp_avg_sq"] + (1 - b2) * gu * gu)
            else:
                u, new_st = adam_direction(gu, st, 0.9, 0.999, 1e-8, t)
        want[i] = (p0 * (1 - lr * s) - lr * u, new_st)
        plain[i] = p0 * (1 - lr * WD) - lr * u
    return want, plain, lam_new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_equations(case, clip, dtype, device):
    """Five steps under a halving lr schedule, one param without a grad on
    the odd steps (the statistics then cover the others only); bf16 params
    with fp32 masters (the statistics are the masters'). Each step equals
    the equations from the optimizer's own state before it, to the table's
    tolerance; plain decoupled decay at the base coefficient is told apart."""
    name, mode, extra = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
              for s in SHAPES]
    kw = dict(lr=LR0, weight_decay=WD, weight_decay_mode=mode, max_grad_norm=0.5 if clip else None,
              master_weights=dtype != torch.float32, **extra)
    if name != "SGD":
        kw["eps"] = 1e-8
    opt = getattr(fused_wd, name)(params, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    weight_tol = TOL[torch.float32]
    told_apart = 0.0
    for step in range(5):
        grads64 = [GRAD_SCALE * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        if step % 2:
            grads64[1] = None
        for p, g in zip(params, grads64):
            p.grad = None if g is None else g.to(dtype).to(device)
        grads64 = [None if g is None else _f64(p.grad) for p, g in zip(params, grads64)]
        coef = 1.0
        if clip:
            norm = torch.sqrt(sum((g * g).sum() for g in grads64 if g is not None)).item()
            coef = min(1.0, 0.5 / (norm + 1e-6))
        lr = opt.param_groups[0]["lr"]
        want, plain, lam = _expected(name, mode, extra, opt, params, grads64, coef, lr)
        untouched = _f64(_weight(opt, params[1]))
        opt.step()
        sched.step()
        for i, (w, st) in want.items():
            got = _weight(opt, params[i])
            torch.testing.assert_close(_f64(got), w, **weight_tol, msg=lambda m: f"step {step}, param {i}: {m}")
            if got is not params[i]:
                torch.testing.assert_close(params[i].detach().cpu(), got.detach().cpu().to(dtype), rtol=0, atol=0)
            for k, v in st.items():
                torch.testing.assert_close(_f64(opt.state[params[i]][k]), v, **weight_tol,
                                           msg=lambda m: f"step {step}, {k} of param {i}: {m}")
            off = (plain[i] - _f64(got)).abs() / (weight_tol["atol"] + weight_tol["rtol"] * _f64(got).abs())
            told_apart = max(told_apart, off.max().item())
        if grads64[1] is None:
            assert torch.equal(_f64(_weight(opt, params[1])), untouched)
        if mode == "adaptive":
            torch.testing.assert_close(_f64(opt.param_groups[0]["adaptive_decay"]).reshape(()), lam,
                                       rtol=1e-6, atol=0)
        want_norm = torch.sqrt(sum((_f64(_weight(opt, p)) ** 2).sum() for p in params))
        torch.testing.assert_close(_f64(opt.last_weight_norm), want_norm, rtol=1e-6, atol=0)
    assert told_apart > 2.0, "plain decoupled decay would have passed too"


# ------------------------------------------------------------ the statistics

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_last_weight_norm_follows_every_change(name, device):
    """last_weight_norm is the norm of the params as they are: after steps
    (no read: the pass wrote the sums), after an in-place change outside the
    optimizer (that param read again), after load_state_dict, and with
    params that never had a grad; None before the first step."""
    params = [torch.randn(s, dtype=torch.float64).float().to(device).requires_grad_() for s in [(300, 70), (9,), ()]]
    frozen = torch.randn(50, device=device, requires_grad=True)
    opt = getattr(fused_wd, name)(params + [frozen], lr=0.01, weight_decay=0.1, momentum=0.9) \
        if name == "SGD" else fused_wd.AdamW(params + [frozen], lr=0.01)
    assert opt.last_weight_norm is None

    def norm_now():
        return torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params + [frozen])).cpu()

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    step()
    torch.testing.assert_close(opt.last_weight_norm.double().cpu(), norm_now(), rtol=1e-6, atol=0)
    reads = opt._norm_slots.stat_reads
    assert reads == 4   # the first read: every param once
    for _ in range(3):
        step()
        torch.testing.assert_close(opt.last_weight_norm.double().cpu(), norm_now(), rtol=1e-6, atol=0)
    assert opt._norm_slots.stat_reads == reads   # the pass kept every sum current
    with torch.no_grad():
        params[0].mul_(3.0)
        frozen.add_(1.0)
    torch.testing.assert_close(opt.last_weight_norm.double().cpu(), norm_now(), rtol=1e-6, atol=0)
    assert opt._norm_slots.stat_reads == reads + 2
    step()
    torch.testing.assert_close(opt.last_weight_norm.double().cpu(), norm_now(), rtol=1e-6, atol=0)
    assert opt._norm_slots.stat_reads == reads + 2


def test_last_weight_norm_reads_masters_and_sees_loaded_ones():
    """With fp32 masters the statistics are the masters'; a loaded
    state_dict brings other masters, which are read again."""
    params = [torch.randn(40, 30).bfloat16().requires_grad_() for _ in range(2)]
    opt = fused_wd.AdamW(params, lr=0.1, master_weights=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    masters = [opt.state[p]["master_param"] for p in params]
    want = torch.sqrt(sum((m.double() ** 2).sum() for m in masters))
    torch.testing.assert_close(opt.last_weight_norm.double(), want, rtol=1e-6, atol=0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.load_state_dict(saved)
    masters = [opt.state[p]["master_param"] for p in params]
    want = torch.sqrt(sum((m.double() ** 2).sum() for m in masters))
    torch.testing.assert_close(opt.last_weight_norm.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_statistics_are_deterministic_and_do_not_change_the_step(name):
    """Tracking the statistics changes no bit of the update, and the sums
    are the same bits whatever the thread count."""
    def run(track, threads):
        torch.manual_seed(0)
        ps = [torch.randn(s).requires_grad_() for s in [(1000, 300), (70,), (5, 5)]]
        opt = getattr(fused_wd, name)(ps, lr=0.01, weight_decay=0.1)
        if track:
            opt.last_weight_norm   # None, but switches tracking on  # noqa: B018
            opt._norm_slots.tracking = True
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
        finally:
            torch.set_num_threads(before)
        stats = [b.clone() for b in opt._norm_slots._stats.values()]
        return [p.detach().clone() for p in ps], stats

    plain, _ = run(False, 2)
    tracked, stats1 = run(True, 2)
    _, stats2 = run(True, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain, tracked))
    assert all(torch.equal(a, b) for a, b in zip(stats1, stats2))


# ------------------------------------------------------------ automatic modes

@pytest.mark.parametrize("mode", ["scheduled", "adaptive"])
def test_no_host_sync(mode):
    """An automatic step reads nothing on the host: no .item(), float() or
    bool() of a tensor inside step()."""
    params = [torch.randn(30, 20).requires_grad_(), torch.randn(7).requires_grad_()]
    opt = fused_wd.AdamW(params, lr=0.01, weight_decay=0.1, weight_decay_mode=mode, max_grad_norm=1.0)

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor inside step()")

    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with mock.patch.object(torch.Tensor, "item", refuse), \
                mock.patch.object(torch.Tensor, "__float__", refuse), \
                mock.patch.object(torch.Tensor, "__bool__", refuse):
            opt.step()


@pytest.mark.parametrize("mode", ["scheduled", "adaptive"])
def test_grad_scaler_unscales_the_statistics(mode):
    """Under a GradScaler the scaled grads give the same step as the same
    grads unscaled (the statistics are unscaled like the norm), and a step
    with an inf grad changes nothing, lam_bar included."""
    torch.manual_seed(1)
    init = [torch.randn(40, 30), torch.randn(11)]
    grads = [[0.1 * torch.randn_like(p) for p in init] for _ in range(3)]

    def run(scale):
        ps = [p.clone().requires_grad_() for p in init]
        opt = fused_wd.AdamW(ps, lr=0.05, weight_decay=0.5, weight_decay_mode=mode, max_grad_norm=0.5)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g * scale
            if scale != 1.0:
                opt.grad_scale = torch.tensor(scale)
                opt.found_inf = torch.tensor(0.0)
            opt.step()
        return ps, opt

    ref, _ = run(1.0)
    scaled, opt = run(1024.0)
    for a, b in zip(ref, scaled):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    before = [p.detach().clone() for p in scaled]
    lam = opt.param_groups[0].get("adaptive_decay")
    lam = None if lam is None else lam.clone()
    for p in scaled:
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, scaled))
    if lam is not None:
        assert torch.equal(opt.param_groups[0]["adaptive_decay"], lam)


@pytest.mark.parametrize("mode", ["scheduled", "adaptive"])
def test_first_step_after_load_state_dict(mode):
    """A fresh optimizer loaded from a checkpoint (lam_bar in its param
    groups) takes the step the saved one takes, to float64 rounding of the
    statistics (read again from the loaded tensors rather than kept by the
    pass)."""
    torch.manual_seed(2)
    init = [torch.randn(40, 30), torch.randn(11)]
    ps = [p.clone().requires_grad_() for p in init]
    opt = fused_wd.AdamW(ps, lr=0.05, weight_decay=0.5, weight_decay_mode=mode)
    for _ in range(3):
        for p in ps:
            p.grad = 0.1 * torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    if mode == "adaptive":
        assert saved["param_groups"][0]["adaptive_decay"].item() > 0
    qs = [p.detach().clone().requires_grad_() for p in ps]
    resumed = fused_wd.AdamW(qs, lr=0.05, weight_decay=0.5, weight_decay_mode=mode)
    resumed.load_state_dict(saved)
    gs = [0.1 * torch.randn_like(p) for p in ps]
    for p, q, g in zip(ps, qs, gs):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    resumed.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_refusals():
    p = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match="scheduled.*Adam or AdamW without amsgrad"):
        fused_wd.SGD(p, lr=0.1, weight_decay=0.1, weight_decay_mode="scheduled")
    with pytest.raises(ValueError, match="scheduled.*Adam or AdamW without amsgrad"):
        fused_wd.AdamW(p, weight_decay_mode="scheduled", amsgrad=True)
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = fused_wd.AdamW([dict(params=[a]), dict(params=[b], betas=(0.9, 0.99))], weight_decay_mode="scheduled")
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match="share betas"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])   # a step that raises changes nothing
    assert all(torch.count_nonzero(v) == 0 for st in opt.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("mode", ["scheduled", "adaptive"])
def test_norm_in_backward_gives_the_same_bits(mode, monkeypatch):
    """The grads' sums of squares come from the norm's slots, whether the
    hooks or the step wrote them: the same bits either way (every param
    hooked, small as they are)."""
    monkeypatch.setattr(fused_wd._norm_slots, "_HOOK_READ_MIN", 1)
    def train(nib):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4))
        opt = fused_wd.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, weight_decay_mode=mode,
                             max_grad_norm=0.5, norm_in_backward=nib)
        x = torch.randn(64, 20)
        for _ in range(4):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    plain, _ = train(False)
    hooked, opt = train(True)
    assert opt.norm_stats["from_backward"] > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))


def _auto_study():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "auto_decay_study.py")
    spec = importlib.util.spec_from_file_location("auto_decay_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_runs_and_measures_the_band():
    """The study's sweep runs on synthetic data, and its sensitivity measure
    is the span of the near-best coefficients."""
    mod = _auto_study()
    offsets = [0.1, 1.0, 10.0]
    assert mod.band_decades([0.5, 0.9, 0.5], offsets) == pytest.approx(1.0)       # one point: one grid step
    assert mod.band_decades([0.895, 0.9, 0.899], offsets) == pytest.approx(3.0)   # all three within 1 point
    data = mod.study.synthetic_data(n_train=32, n_test=64)
    cfg = mod.study.tiny_config()
    cfg.steps = 6
    sweep = mod.run(cfg, [1e-2], offsets, data=data, progress=lambda line: None)
    summary = mod.summarize(sweep)
    assert set(summary) == set(mod.MODES)
    for cell in sweep.values():
        assert len(cell["test_acc"]) == 1 and len(cell["test_acc"][0]) == len(offsets)
        assert all(0.0 <= a <= 1.0 for a in cell["test_acc"][0])
