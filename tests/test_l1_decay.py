"""L1 weight decay (docs/weight-decay.md, "L1 and proximal L1"), checked
against its equations written out here in float64 plain PyTorch:

  "l1" (coupled):  g <- g + wd * sign(p), sign(0) = 0, before the moments
                   (the gradient of wd * sum|p| added to the loss)
  "l1_proximal":   p' = p - lr * u            the mode's update without decay
                   p  <- sign(p') * max(|p'| - lr * wd, 0)

with u the step direction before the lr: Adam's bias-corrected
m_hat / (sqrt(v_hat) + eps) (amsgrad's max where it applies), SGD's momentum
direction (nesterov included) or the gradient, and lr the step's lr (a
scheduler's, a tensor's). The proximal step gives exact zeros.
"""
import zlib

import pytest
import torch

import fused_wd
from conftest import DEVICES, adam_hyper, sgd_hyper, tol_for

SHAPES = [(23, 17), (40,), (), (3, 4, 5)]
LR0 = 0.1   # the initial lr; a scheduler halves it every step
WD = 2.0    # l1: the decay term is 2 * sign(p); l1_proximal: thresholds 0.2, 0.1, 0.05, 0.025


# ------------------------------------------------------------ the equations

def decay_grad(mode, g, p, wd):
    """The gradient after coupled decay (l1 and, for the confused check, l2)."""
    if mode == "l1":
        return g + wd * torch.sign(p)
    if mode == "l2":
        return g + wd * p
    return g


def after_update(mode, p, u, lr, wd):
    """p - lr * u, then the decoupled stage of `mode` (the proximal step,
    or, for the confused check, a decoupled shrink)."""
    if mode == "decoupled":
        p = p * (1 - lr * wd)
    q = p - lr * u
    if mode == "l1_proximal":
        q = torch.sign(q) * torch.clamp(q.abs() - lr * wd, min=0.0)
    return q


def adam_equation(p, g, st, hp, t):
    """One Adam step in float64 from the state st (float64 tensors)."""
    b1, b2 = hp["betas"]
    if hp.get("maximize"):
        g = -g
    g = decay_grad(hp["mode"], g, p, WD)
    m = b1 * st["exp_avg"] + (1 - b1) * g
    v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    out = dict(exp_avg=m, exp_avg_sq=v)
    vh = v
    if hp.get("amsgrad"):
        vh = torch.maximum(st["max_exp_avg_sq"], v)
        out["max_exp_avg_sq"] = vh
    u = (m / (1 - b1 ** t)) / (torch.sqrt(vh / (1 - b2 ** t)) + hp["eps"])
    out["param"] = after_update(hp["mode"], p, u, hp["lr"], WD)
    return out


def sgd_equation(p, g, st, hp):
    """One SGD step in float64; st["momentum_buffer"] is None on the step
    that creates the buffer."""
    mu, damp = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
    if hp.get("maximize"):
        g = -g
    g = decay_grad(hp["mode"], g, p, WD)
    out = {}
    u = g
    if mu:
        buf = g if st["momentum_buffer"] is None else mu * st["momentum_buffer"] + (1 - damp) * g
        out["momentum_buffer"] = buf
        u = g + mu * buf if hp.get("nesterov") else buf
    out["param"] = after_update(hp["mode"], p, u, hp["lr"], WD)
    return out


# ------------------------------------------------------------ against the equations

CASES = {
    "Adam": ("Adam", dict()),
    "AdamW": ("AdamW", dict()),
    "AdamW-amsgrad": ("AdamW", dict(amsgrad=True)),
    "Adam-amsgrad-maximize": ("Adam", dict(amsgrad=True, maximize=True)),
    "SGD": ("SGD", dict()),
    "SGD-momentum-dampening": ("SGD", dict(momentum=0.9, dampening=0.1)),
    "SGD-nesterov": ("SGD", dict(momentum=0.9, nesterov=True)),
    "SGD-momentum-maximize": ("SGD", dict(momentum=0.8, maximize=True)),
}
MODES = ("l1", "l1_proximal")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step")
# what a confused kernel might have run instead: L2 in place of L1; the
# update without its threshold, with the threshold folded into the gradient
# or with a decoupled shrink in its place. The test checks that each would
# have been caught.
CONFUSED = {"l1": ("l2", "none"), "l1_proximal": ("none", "l1", "decoupled")}


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def _equation(name, p0, g, st, hp):
    if name == "SGD":
        return sgd_equation(p0, g, st, hp)
    st = dict(st)
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if st[k] is None:
            st[k] = torch.zeros_like(p0)
    t = (0.0 if st["step"] is None else st["step"].item()) + 1
    return adam_equation(p0, g, st, dict(hp, betas=(0.9, 0.999), eps=1e-8), t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_equations_under_a_scheduler(case, mode, clip, dtype, device):
    """Every step of a halving lr schedule: the optimizer's result from its
    own state equals the equations in float64, rounded once to the storage
    dtype, to the table's tolerance; the proximal step leaves exactly the
    zeros the equations give; the variants a confused kernel would run
    instead are told apart."""
    name, extra = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}/{mode}".encode()))
    params = [(torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
              for s in SHAPES]
    opt_kw = dict(lr=LR0, weight_decay=WD, weight_decay_mode=mode, max_grad_norm=1.0 if clip else None,
                  **extra)
    if name != "SGD":
        opt_kw["eps"] = 1e-8
    opt = getattr(fused_wd, name)(params, **opt_kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    tol = tol_for(dtype, reference=True)
    zeros = 0
    confused_off = {c: 0.0 for c in CONFUSED[mode]}
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype).to(device)
        g64 = [_f64(p.grad) for p in params]
        coef = 1.0
        if clip:
            norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in g64]))
            coef = min(1.0, 1.0 / (norm.item() + 1e-6))
        hp = dict(extra, lr=opt.param_groups[0]["lr"], mode=mode)
        assert step == 0 or hp["lr"] < LR0
        before = [(_f64(p), {k: (v.clone() if k == "step" else _f64(v)) for k, v in opt.state[p].items()})
                  for p in params]
        opt.step()
        sched.step()
        for p, g, (p0, st) in zip(params, g64, before):
            st = {k: st.get(k) for k in STATE_KEYS}
            want = _equation(name, p0, g * coef, st, hp)
            for k, w in want.items():
                got = p if k == "param" else opt.state[p][k]
                torch.testing.assert_close(got.detach().cpu(), w.to(got.dtype), **tol,
                                           msg=lambda m: f"step {step}, {k}: {m}")
            got = p.detach().cpu()
            if mode == "l1_proximal":
                # exact zeros, exactly where the equations put them
                assert torch.equal(got == 0, want["param"] == 0), f"step {step}: the zeros differ"
                zeros += int((got == 0).sum())
            for c in confused_off:
                alt = _equation(name, p0, g * coef, st, dict(hp, mode=c))["param"].to(dtype)
                off = (alt - got).abs() / (tol["atol"] + tol["rtol"] * got.abs())
                confused_off[c] = max(confused_off[c], off.max().item())
    if mode == "l1_proximal":
        assert zeros > 0
    for c, off in confused_off.items():
        assert off > 2.0, f"the confused variant {c!r} would have passed too"


# ------------------------------------------------------------ by hand

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_proximal_by_hand(device, momentum):
    """SGD (the first step: the momentum buffer is the gradient), values
    exact in binary, threshold lr * wd = 0.25: |p - lr*g| <= 0.25 becomes an
    exact +0 (the boundary included), the rest moves 0.25 towards zero."""
    p0 = torch.tensor([1.0, -1.0, 0.25, -0.125, 0.0, 2.0, -0.5, 0.5], device=device)
    g = torch.tensor([0.5, -0.5, 0.0, 0.25, 0.0, -1.0, -0.5, 0.75], device=device)
    want = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 2.25, 0.0, 0.0], device=device)
    p = p0.clone().requires_grad_()
    p.grad = g.clone()
    fused_wd.SGD([p], lr=0.5, momentum=momentum, weight_decay=0.5, weight_decay_mode="l1_proximal").step()
    assert torch.equal(p.detach(), want)
    assert not torch.signbit(p.detach()[want == 0]).any()  # +0, not -0


@pytest.mark.parametrize("device", DEVICES)
def test_l1_sign_of_zero_is_zero(device):
    """Coupled L1 adds wd * sign(p) with sign(0) = 0 (the gradient torch's
    autograd gives |p| at 0): a zero weight with a zero gradient stays put
    under Adam, a nonzero one is pulled towards zero by the first step's lr."""
    p = torch.tensor([0.0, 1.0, -1.0], device=device, requires_grad=True)
    p.grad = torch.zeros(3, device=device)
    fused_wd.Adam([p], lr=0.1, weight_decay=0.01, weight_decay_mode="l1").step()
    torch.testing.assert_close(p.detach().cpu(), torch.tensor([0.0, 0.9, -0.9]), rtol=1e-6, atol=1e-7)
    assert p.detach()[0].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_proximal_threshold_follows_a_tensor_lr(device, name):
    """A tensor lr, changed by a scheduler between steps, gives the bits of the
    same run with a float lr: the threshold uses the step's lr, read on the
    device."""
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    out = []
    for lr in (LR0, torch.tensor(LR0, device=device)):
        ps = [x.clone().to(device).requires_grad_() for x in init]
        extra = dict(momentum=0.9) if name == "SGD" else {}
        opt = getattr(fused_wd, name)(ps, lr=lr, weight_decay=WD, weight_decay_mode="l1_proximal", **extra)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            opt.step()
            sched.step()
        out.append([p.detach().cpu() for p in ps])
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert sum(int((a == 0).sum()) for a in out[0]) > 0


# ------------------------------------------------------------ mixed precision

LAYOUTS = {
    "fp16": dict(dtype=torch.float16),
    "bf16-master": dict(dtype=torch.bfloat16, master_weights=True),
    "fp16-master": dict(dtype=torch.float16, master_weights=True),
    "bf16-fp32state": dict(dtype=torch.bfloat16, state_dtype=torch.float32),
    "fp32-bf16state": dict(dtype=torch.float32, state_dtype=torch.bfloat16),
    "bf16-sr": dict(dtype=torch.bfloat16, stochastic_rounding=True, sr_seed=7),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opt_name", ["AdamW", "AdamW-amsgrad", "SGD-momentum", "SGD"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_precision_matches_the_reference(layout, opt_name, mode, device):
    """Every mixed layout (fp32 master, bf16 states, stochastic rounding)
    against fused_wd.reference, which rounds like the kernels, over steps of
    a schedule; the proximal zeros are exact in the stored param and in the
    master."""
    kw = dict(LAYOUTS[layout])
    dtype = kw.pop("dtype")
    name, _, variant = opt_name.partition("-")
    extra = dict(amsgrad=variant == "amsgrad") if name == "AdamW" else dict(momentum=0.9 if variant else 0.0)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}/{opt_name}/{mode}".encode()))
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(3)]
    runs = []
    for cls in (getattr(fused_wd.reference, name), getattr(fused_wd, name)):
        ps = [x.clone().to(device).requires_grad_() for x in init]
        opt = cls(ps, lr=LR0, weight_decay=WD, weight_decay_mode=mode, max_grad_norm=1.0, **kw, **extra)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            opt.step()
            sched.step()
        runs.append((ps, opt))
    (ref, ref_opt), (got, opt) = runs
    tol = tol_for(dtype, reference=True)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.detach(), a.detach(), **tol)
        if "master_param" in opt.state[b]:
            torch.testing.assert_close(opt.state[b]["master_param"], ref_opt.state[a]["master_param"],
                                       **tol_for(torch.float32))
    if mode == "l1_proximal":
        zeros = sum(int((b == 0).sum()) for b in got)
        assert zeros > 0 and zeros == sum(int((a == 0).sum()) for a in ref)
        for b in got:
            if "master_param" in opt.state[b]:
                assert torch.equal(opt.state[b]["master_param"] == 0, b.detach() == 0)


# ------------------------------------------------------------ refused combinations

def _param():
    return torch.ones(3, requires_grad=True)


@pytest.mark.parametrize("cls", ["Adam", "AdamW", "SGD"])
@pytest.mark.parametrize("mode", MODES)
def test_cautious_refused_with_l1(cls, mode):
    with pytest.raises(ValueError, match=f"cautious_weight_decay.*'{mode}'"):
        getattr(fused_wd, cls)([_param()], weight_decay=0.1, weight_decay_mode=mode,
                               cautious_weight_decay=True)
    opt = getattr(fused_wd, cls)([_param()], lr=0.1, cautious_weight_decay=True,
                                 weight_decay_mode="decoupled")
    with pytest.raises(ValueError, match=f"cautious_weight_decay.*'{mode}'"):
        opt.add_param_group({"params": [_param()], "weight_decay_mode": mode})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("mode", MODES)
def test_cautious_with_l1_refused_at_step_changes_nothing(mode):
    p = _param()
    opt = fused_wd.AdamW([p], lr=0.1, weight_decay=0.1, cautious_weight_decay=True)
    p.grad = torch.ones(3)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["weight_decay_mode"] = mode
    with pytest.raises(ValueError, match=f"cautious_weight_decay.*'{mode}'"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("decay_mode", [4, 5])
def test_cautious_with_l1_refused_by_the_ops(decay_mode):
    ops = torch.ops.fused_wd
    p, g = torch.ones(3), torch.ones(3)
    m, v, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
    with pytest.raises(RuntimeError, match="cautious_wd needs decay_mode"):
        ops.adam_([p], [g], [m], [v], [], [step], [], [],
                  **adam_hyper(weight_decay=0.1, decay_mode=decay_mode, cautious_wd=True))
    with pytest.raises(RuntimeError, match="cautious_wd needs decay_mode"):
        ops.sgd_([p], [g], [], [], [], [], [], **sgd_hyper(weight_decay=0.1, decay_mode=decay_mode,
                                                           cautious_wd=True))
    assert torch.equal(p, torch.ones(3)) and torch.equal(m, torch.zeros(3)) and step.item() == 0


@pytest.mark.parametrize("mode", MODES)
def test_decoupled_weight_decay_flag(mode):
    """Adam's torch flag: coupled L1 is not decoupled decay, proximal L1 is
    (it never reaches the moments); decoupled_weight_decay=True with an L1
    mode is a contradiction."""
    opt = fused_wd.Adam([_param()], weight_decay=0.1, weight_decay_mode=mode)
    assert opt.param_groups[0]["decoupled_weight_decay"] is (mode == "l1_proximal")
    with pytest.raises(ValueError, match="contradicts"):
        fused_wd.Adam([_param()], decoupled_weight_decay=True, weight_decay_mode=mode)
