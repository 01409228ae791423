"""Corrected and cautious weight decay (docs/weight-decay.md, "Corrected and
cautious decay"), checked against their equations written out here in
float64 plain PyTorch, against timm's corrected AdamW, and on hand-made
cases that show the mask:

  corrected:  p <- p * (1 - wd * lr**2 / initial_lr)          before the update
  cautious:   p <- p - s * 1[u * p >= 0] * p - lr * u          mask on the pre-decay p

with s = lr*wd (decoupled), wd*lr/initial_lr (independent) or
wd*lr**2/initial_lr (corrected), and u the step direction before the lr:
Adam's bias-corrected m_hat / (sqrt(v_hat) + eps) (amsgrad's max where it
applies), SGD's momentum direction (nesterov included) or the gradient.
"""
import copy
import zlib

import pytest
import torch

import fused_wd
from conftest import DEVICES, adam_hyper, sgd_hyper, tol_for

SHAPES = [(23, 17), (40,), (), (3, 4, 5)]
LR0 = 0.1          # the initial lr; a scheduler halves it every step
WD = 1.0           # per step at lr 0.05: decoupled 0.05, independent 0.5, corrected 0.025


# ------------------------------------------------------------ the equations

def shrink(mode, wd, lr, initial_lr):
    """s of the issue: what the decay takes off p (times p) this step."""
    return {"decoupled": lr * wd, "independent": wd * lr / initial_lr,
            "corrected": wd * lr * lr / initial_lr}[mode]


def decayed(p, u, s, cautious):
    """p - s * mask * p, the mask judged on the pre-decay p."""
    mask = (u * p >= 0).to(p.dtype) if cautious else torch.ones_like(p)
    return p - s * mask * p, mask


def adam_equation(p, g, st, hp, t):
    """One Adam step in float64 from the state st (float64 tensors)."""
    b1, b2 = hp["betas"]
    if hp.get("maximize"):
        g = -g
    m = b1 * st["exp_avg"] + (1 - b1) * g
    v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    out = dict(exp_avg=m, exp_avg_sq=v)
    vh = v
    if hp.get("amsgrad"):
        vh = torch.maximum(st["max_exp_avg_sq"], v)
        out["max_exp_avg_sq"] = vh
    u = (m / (1 - b1 ** t)) / (torch.sqrt(vh / (1 - b2 ** t)) + hp["eps"])
    s = shrink(hp["mode"], WD, hp["lr"], hp["initial_lr"])
    p, mask = decayed(p, u, s, hp["cautious"])
    out["param"] = p - hp["lr"] * u
    return out, mask


def sgd_equation(p, g, st, hp):
    """One SGD step in float64; st["momentum_buffer"] is None on the step
    that creates the buffer."""
    mu, damp = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
    if hp.get("maximize"):
        g = -g
    out = {}
    u = g
    if mu:
        buf = g if st["momentum_buffer"] is None else mu * st["momentum_buffer"] + (1 - damp) * g
        out["momentum_buffer"] = buf
        u = g + mu * buf if hp.get("nesterov") else buf
    s = shrink(hp["mode"], WD, hp["lr"], hp["initial_lr"])
    p, mask = decayed(p, u, s, hp["cautious"])
    out["param"] = p - hp["lr"] * u
    return out, mask


# ------------------------------------------------------------ against the equations

CASES = {
    "Adam": ("Adam", dict()),
    "AdamW": ("AdamW", dict()),
    "AdamW-amsgrad": ("AdamW", dict(amsgrad=True)),
    "AdamW-maximize": ("AdamW", dict(maximize=True)),
    "SGD": ("SGD", dict()),
    "SGD-momentum-dampening": ("SGD", dict(momentum=0.9, dampening=0.1)),
    "SGD-nesterov": ("SGD", dict(momentum=0.9, nesterov=True)),
    "SGD-momentum-maximize": ("SGD", dict(momentum=0.8, maximize=True)),
}
VARIANTS = {
    "corrected": ("corrected", False),
    "cautious-decoupled": ("decoupled", True),
    "cautious-independent": ("independent", True),
    "cautious-corrected": ("corrected", True),
}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step")
# the other variant a wrong kernel might have run instead: the test checks
# that it would have been caught
CONFUSED = {
    "corrected": ("decoupled", False),
    "cautious-decoupled": ("decoupled", False),
    "cautious-independent": ("independent", False),
    "cautious-corrected": ("corrected", False),
}


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_equations_under_a_scheduler(case, variant, clip, dtype, device):
    """Every step of a halving lr schedule (lr != initial_lr after the
    first): the optimizer's result from its own state equals the equations
    in float64, rounded once to the storage dtype, to the table's tolerance;
    and the variant a confused kernel would run instead is told apart."""
    name, extra = CASES[case]
    mode, cautious = VARIANTS[variant]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}/{variant}".encode()))
    params = [(torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
              for s in SHAPES]
    opt_kw = dict(lr=LR0, weight_decay=WD, weight_decay_mode=mode, cautious_weight_decay=cautious,
                  max_grad_norm=1.0 if clip else None, **extra)
    if name != "SGD":
        opt_kw["eps"] = 1e-8
    opt = getattr(fused_wd, name)(params, **opt_kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    tol = tol_for(dtype, reference=True)
    seen_masked = seen_decayed = 0
    confused_off = 0.0
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype).to(device)
        g64 = [_f64(p.grad) for p in params]
        coef = 1.0
        if clip:
            norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in g64]))
            coef = min(1.0, 1.0 / (norm.item() + 1e-6))
        group = opt.param_groups[0]
        hp = dict(extra, lr=group["lr"], initial_lr=group["initial_lr"], mode=mode, cautious=cautious)
        assert hp["initial_lr"] == LR0 and (step == 0 or hp["lr"] < LR0)
        before = [(_f64(p), {k: (v.clone() if k == "step" else _f64(v)) for k, v in opt.state[p].items()})
                  for p in params]
        opt.step()
        sched.step()
        for p, g, (p0, st) in zip(params, g64, before):
            st = {k: st.get(k) for k in STATE_KEYS}
            if name == "SGD":
                want, mask = sgd_equation(p0, g * coef, st, hp)
                alt, _ = sgd_equation(p0, g * coef, st, dict(hp, mode=CONFUSED[variant][0],
                                                             cautious=CONFUSED[variant][1]))
            else:
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if st[k] is None:
                        st[k] = torch.zeros_like(p0)
                t = (0.0 if st["step"] is None else st["step"].item()) + 1
                ahp = dict(hp, betas=(0.9, 0.999), eps=1e-8)
                want, mask = adam_equation(p0, g * coef, st, ahp, t)
                alt, _ = adam_equation(p0, g * coef, st, dict(ahp, mode=CONFUSED[variant][0],
                                                              cautious=CONFUSED[variant][1]), t)
            for k, w in want.items():
                got = p if k == "param" else opt.state[p][k]
                torch.testing.assert_close(got.detach().cpu(), w.to(got.dtype), **tol,
                                           msg=lambda m: f"step {step}, {k}: {m}")
            seen_masked += int((mask == 0).sum())
            seen_decayed += int((mask == 1).sum())
            got = p.detach().cpu()
            off = (alt["param"].to(dtype) - got).abs() / (tol["atol"] + tol["rtol"] * got.abs())
            confused_off = max(confused_off, off.max().item())
    assert seen_decayed > 0
    assert seen_masked > 0 or not cautious
    assert confused_off > 2.0, "the confused variant would have passed too"


# ------------------------------------------------------------ against timm

@pytest.mark.parametrize("amsgrad", [False, True])
def test_corrected_matches_timm(amsgrad):
    """timm's AdamWLegacy(corrected_weight_decay=True) (its "adamc") shrinks
    by wd * lr**2 / max_lr with max_lr the constructor's lr; ours divides by
    the group's initial_lr, which a scheduler sets to the same value for a
    single group built with that lr. Then they agree, over a decaying
    schedule."""
    timm_adamw = pytest.importorskip("timm.optim.adamw")
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SHAPES]

    def train(make):
        ps = [p.clone().requires_grad_() for p in init]
        opt = make(ps)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        g = torch.Generator().manual_seed(4)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step()
        return ps

    runs = [train(lambda ps: timm_adamw.AdamWLegacy(ps, lr=LR0, weight_decay=0.5, amsgrad=amsgrad,
                                                    corrected_weight_decay=True, foreach=False)),
            train(lambda ps: fused_wd.AdamW(ps, lr=LR0, weight_decay=0.5, amsgrad=amsgrad,
                                            weight_decay_mode="corrected"))]
    for a, b in zip(*runs):
        torch.testing.assert_close(b.detach(), a.detach(), **tol_for(torch.float32))
    # not vacuous: decoupled decay at the same settings ends elsewhere
    ps = train(lambda ps: fused_wd.AdamW(ps, lr=LR0, weight_decay=0.5, amsgrad=amsgrad))
    assert max((x - y).abs().max().item() for x, y in zip(ps, runs[1]) if x.numel()) > 1e-3


# ------------------------------------------------------------ the mask, by hand

@pytest.mark.parametrize("device", DEVICES)
def test_sgd_mask_by_hand(device):
    """SGD without momentum, u = g, values exact in binary: the coordinates
    with g * p < 0 are only moved by the update; those with g * p >= 0 (u or
    p zero included) are also shrunk by 1 - lr * wd = 0.75."""
    p0 = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0, 1.5], device=device)
    g = torch.tensor([0.5, 0.5, -0.5, -0.5, -0.25, 0.25, 1.0, 0.0], device=device)
    agree = torch.tensor([True, False, False, True, False, False, True, True], device=device)
    assert torch.equal(agree, g * p0 >= 0)
    p = p0.clone().requires_grad_()
    p.grad = g.clone()
    fused_wd.SGD([p], lr=0.5, weight_decay=0.5, weight_decay_mode="decoupled",
                 cautious_weight_decay=True).step()
    want = torch.where(agree, p0 * 0.75, p0) - 0.5 * g
    assert torch.equal(p.detach(), want)
    # exactly the disagreeing coordinates keep their value, up to the update
    kept = (p.detach() + 0.5 * g) == p0
    assert torch.equal(kept[p0 != 0], ~agree[p0 != 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_mask_by_hand(device, maximize):
    """Adam's first step moves along u = m_hat/(sqrt(v_hat)+eps), whose sign is
    that of the (negated, under maximize) gradient. Cautious decay gives,
    bit for bit, the run without decay where u * p < 0 and the decoupled run
    where u * p >= 0."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(1000, generator=gen).to(device)
    g = torch.randn(1000, generator=gen).to(device)
    u_sign = -g if maximize else g
    agree = u_sign * p0 >= 0
    assert 0.3 < agree.float().mean().item() < 0.7
    out = {}
    for name, kw in (("cautious", dict(weight_decay=0.2, cautious_weight_decay=True)),
                     ("decoupled", dict(weight_decay=0.2)), ("none", dict(weight_decay=0.0))):
        p = p0.clone().requires_grad_()
        p.grad = g.clone()
        fused_wd.AdamW([p], lr=0.1, maximize=maximize, **kw).step()
        out[name] = p.detach()
    assert torch.equal(out["cautious"][agree], out["decoupled"][agree])
    assert torch.equal(out["cautious"][~agree], out["none"][~agree])
    assert not torch.equal(out["decoupled"][~agree], out["none"][~agree])  # the decay did act


# ------------------------------------------------------------ all agreeing == decoupled, bitwise

LAYOUTS = {
    "fp32": dict(dtype=torch.float32),
    "fp64": dict(dtype=torch.float64),
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16-master": dict(dtype=torch.bfloat16, master_weights=True),
    "bf16-fp32state": dict(dtype=torch.bfloat16, state_dtype=torch.float32),
    "fp32-bf16state": dict(dtype=torch.float32, state_dtype=torch.bfloat16),
    "bf16-sr": dict(dtype=torch.bfloat16, stochastic_rounding=True, sr_seed=7),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["decoupled", "independent", "corrected"])
@pytest.mark.parametrize("opt_name", ["AdamW", "AdamW-amsgrad", "SGD-momentum", "SGD-nesterov", "SGD"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cautious_with_every_coordinate_agreeing_is_plain_decay(layout, opt_name, mode, device):
    """Gradients whose sign follows the param's keep u * p >= 0 everywhere
    (and the params far from zero): cautious decay then gives the bits of
    the plain mode, in every storage layout, over several steps."""
    kw = dict(LAYOUTS[layout])
    dtype = kw.pop("dtype")
    name, _, variant = opt_name.partition("-")
    extra = dict(amsgrad=variant == "amsgrad") if name == "AdamW" else dict(
        momentum=0.9 if variant else 0.0, nesterov=variant == "nesterov")
    gen = torch.Generator().manual_seed(1)
    init = [(torch.sign(torch.randn(s, generator=gen)) * (0.5 + torch.rand(s, generator=gen))).to(dtype)
            for s in SHAPES]
    mags = [[torch.rand(s, generator=gen) for s in SHAPES] for _ in range(3)]
    out = []
    for cautious in (False, True):
        ps = [p.clone().to(device).requires_grad_() for p in init]
        opt = getattr(fused_wd, name)(ps, lr=0.01, weight_decay=0.5, weight_decay_mode=mode,
                                      cautious_weight_decay=cautious, **kw, **extra)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for step in range(3):
            for p, mag in zip(ps, mags[step]):
                p.grad = (torch.sign(p.detach()).cpu() * (mag + 0.1)).to(dtype).to(device)
            opt.step()
            sched.step()
        out.append([p.detach().cpu() for p in ps])
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    for a, b in zip(*out):
        assert torch.equal(a.view(as_int[a.element_size()]), b.view(as_int[b.element_size()]))


# ------------------------------------------------------------ refused combinations

def _param():
    return torch.ones(3, requires_grad=True)


@pytest.mark.parametrize("make", [
    lambda p: fused_wd.Adam([p], weight_decay=0.1, cautious_weight_decay=True),
    lambda p: fused_wd.AdamW([p], weight_decay_mode="l2", cautious_weight_decay=True),
    lambda p: fused_wd.SGD([p], weight_decay=0.1, cautious_weight_decay=True),
    lambda p: fused_wd.AdamW([p], cautious_weight_decay=1),
], ids=["Adam-default-l2", "AdamW-l2", "SGD-default-l2", "not-a-bool"])
def test_cautious_refused_at_construction(make):
    with pytest.raises(ValueError, match="cautious_weight_decay"):
        make(_param())


def test_cautious_refused_in_add_param_group():
    opt = fused_wd.AdamW([_param()], cautious_weight_decay=True)
    with pytest.raises(ValueError, match="cautious_weight_decay.*'l2'"):
        opt.add_param_group({"params": [_param()], "weight_decay_mode": "l2"})
    sgd = fused_wd.SGD([_param()], lr=0.1)
    with pytest.raises(ValueError, match="cautious_weight_decay.*'l2'"):
        sgd.add_param_group({"params": [_param()], "cautious_weight_decay": True})
    assert len(opt.param_groups) == 1 and len(sgd.param_groups) == 1
    # a valid combination is taken, per group
    sgd.add_param_group({"params": [_param()], "cautious_weight_decay": True,
                         "weight_decay_mode": "corrected", "weight_decay": 0.1})
    assert sgd.param_groups[1]["cautious_weight_decay"] and sgd.param_groups[1]["initial_lr"] == 0.1


def test_cautious_with_l2_refused_at_step_changes_nothing():
    """A group edited into l2 + cautious after construction: step() raises
    before any kernel runs, and params and state are as they were."""
    p = _param()
    opt = fused_wd.AdamW([p], lr=0.1, weight_decay=0.1, cautious_weight_decay=True)
    p.grad = torch.ones(3)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["weight_decay_mode"] = "l2"
    with pytest.raises(ValueError, match="cautious_weight_decay.*'l2'"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


def test_cautious_with_l2_refused_by_the_ops():
    ops = torch.ops.fused_wd
    p, g = torch.ones(3), torch.ones(3)
    m, v, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
    with pytest.raises(RuntimeError, match="cautious_wd needs decay_mode"):
        ops.adam_([p], [g], [m], [v], [], [step], [], [], **adam_hyper(weight_decay=0.1, cautious_wd=True))
    with pytest.raises(RuntimeError, match="cautious_wd needs decay_mode"):
        ops.sgd_([p], [g], [], [], [], [], [], **sgd_hyper(weight_decay=0.1, cautious_wd=True))
    with pytest.raises(RuntimeError, match="decay_mode must be"):
        ops.sgd_([p], [g], [], [], [], [], [], **sgd_hyper(weight_decay=0.1, decay_mode=6))
    assert torch.equal(p, torch.ones(3)) and torch.equal(m, torch.zeros(3)) and step.item() == 0


def test_corrected_needs_a_nonzero_initial_lr():
    with pytest.raises(ValueError, match="'corrected' divides by the initial lr"):
        fused_wd.AdamW([_param()], lr=0.0, weight_decay_mode="corrected")


# ------------------------------------------------------------ state_dict

def test_state_dict_keeps_the_options():
    """The options live in the param groups, so in the state_dict; an
    optimizer built with other options takes them on load, and a checkpoint
    from before cautious decay existed loads with it off."""
    torch.manual_seed(0)
    init = torch.randn(50)
    a = init.clone().requires_grad_()
    opt = fused_wd.AdamW([a], lr=0.1, weight_decay=0.3, weight_decay_mode="corrected",
                         cautious_weight_decay=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(2):
        a.grad = torch.randn(50)
        opt.step()
        sched.step()
    sd = copy.deepcopy(opt.state_dict())  # the state_dict holds the live state tensors
    b = a.detach().clone().requires_grad_()
    opt2 = fused_wd.AdamW([b], lr=1.0)
    opt2.load_state_dict(sd)
    group = opt2.param_groups[0]
    assert group["cautious_weight_decay"] is True and group["weight_decay_mode"] == "corrected"
    assert group["initial_lr"] == 0.1 and group["lr"] == 0.025
    grad = torch.randn(50)
    a.grad, b.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(a.detach(), b.detach())

    old = copy.deepcopy(opt.state_dict())
    for g in old["param_groups"]:
        del g["cautious_weight_decay"]
    opt3 = fused_wd.AdamW([init.clone().requires_grad_()])
    opt3.load_state_dict(old)
    assert opt3.param_groups[0]["cautious_weight_decay"] is False
