"""What docs/weight-decay.md claims, checked: L2 mode is the loss term
lambda/2*||w||^2 (under any optimizer), decoupled decay is not (under Adam)
but is the same thing for plain SGD with lr folded in, decay is not clipped,
and the example study runs end to end with decay shrinking the weights."""
import importlib.util
import math
import os

import pytest
import torch

import fused_wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = dict(rtol=1e-6, atol=1e-7)   # a few float32 ulps at magnitude ~1
# Two algebraically equal updates computed in different orders, 20 steps:
# about one ulp apart per step (the repo's float32 tolerance, conftest.TOL).
FP32_REORDERED = dict(rtol=1e-5, atol=1e-6)


def _study():
    path = os.path.join(ROOT, "examples", "weight_decay_study.py")
    spec = importlib.util.spec_from_file_location("weight_decay_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------ a small problem

def _problem(seed=0):
    """Params (a matrix, a vector) and data for a small nonlinear least-squares loss."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 5, generator=g)
    b = torch.randn(8, generator=g)
    x = torch.randn(32, 5, generator=g)
    y = torch.randn(32, 8, generator=g)
    return [w, b], (x, y)


def _loss(params, data):
    w, b = params
    x, y = data
    return ((torch.tanh(x @ w.t() + b) - y) ** 2).mean()


def _run(make_opt, steps=10, l2_in_loss=0.0, seed=0, l1_in_loss=0.0):
    """Trains the small problem for `steps` full-batch steps; `l2_in_loss`
    adds lambda/2 * ||w||^2 (all params) to the loss, `l1_in_loss` adds
    lambda * sum|w|."""
    init, data = _problem(seed)
    params = [p.clone().requires_grad_(True) for p in init]
    opt = make_opt(params)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(params, data)
        if l2_in_loss:
            loss = loss + 0.5 * l2_in_loss * sum((p * p).sum() for p in params)
        if l1_in_loss:
            loss = loss + l1_in_loss * sum(p.abs().sum() for p in params)
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


def _close(a, b, **tol):
    return all(torch.allclose(x, y, **tol) for x, y in zip(a, b))


def _maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ------------------------------------------------------------ (2) L2 mode == loss term

LAM = 0.1


@pytest.mark.parametrize("name,make", [
    ("Adam", lambda wd: lambda ps: fused_wd.Adam(ps, lr=0.01, weight_decay=wd)),
    ("Adam-amsgrad", lambda wd: lambda ps: fused_wd.Adam(ps, lr=0.01, weight_decay=wd, amsgrad=True)),
    ("AdamW-mode-l2", lambda wd: lambda ps: fused_wd.AdamW(ps, lr=0.01, weight_decay=wd, weight_decay_mode="l2")),
    ("SGD-momentum", lambda wd: lambda ps: fused_wd.SGD(ps, lr=0.05, momentum=0.9, weight_decay=wd)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_l2_mode_is_the_loss_term(name, make):
    """weight_decay=lambda in "l2" mode == weight_decay=0 with lambda/2*||w||^2
    added to the loss, to float32 rounding, over several steps."""
    fused = _run(make(LAM))
    in_loss = _run(make(0.0), l2_in_loss=LAM)
    assert _close(fused, in_loss, **FP32), _maxdiff(fused, in_loss)
    plain = _run(make(0.0))
    assert _maxdiff(fused, plain) > 1e-3       # and the decay did something


@pytest.mark.parametrize("name,make", [
    ("Adam", lambda wd: lambda ps: fused_wd.Adam(ps, lr=0.01, weight_decay=wd, weight_decay_mode="l1")),
    ("Adam-amsgrad", lambda wd: lambda ps: fused_wd.Adam(ps, lr=0.01, weight_decay=wd, amsgrad=True,
                                                         weight_decay_mode="l1")),
    ("AdamW-mode-l1", lambda wd: lambda ps: fused_wd.AdamW(ps, lr=0.01, weight_decay=wd, weight_decay_mode="l1")),
    ("SGD-momentum", lambda wd: lambda ps: fused_wd.SGD(ps, lr=0.05, momentum=0.9, weight_decay=wd,
                                                        weight_decay_mode="l1")),
    ("SGD-nesterov", lambda wd: lambda ps: fused_wd.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                        weight_decay=wd, weight_decay_mode="l1")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_l1_mode_is_the_loss_term(name, make):
    """weight_decay=lambda in "l1" mode == weight_decay=0 with lambda*sum|w|
    added to the loss, bit for bit over several steps: autograd's gradient of
    |w| is sign(w) (0 at 0), lambda*sign(w) is exact, and both sides add it
    to the same loss gradient once. The mode with weight decay 0 (nothing
    added) is not the loss term."""
    fused = _run(make(LAM))
    in_loss = _run(make(0.0), l1_in_loss=LAM)
    assert all(torch.equal(a, b) for a, b in zip(fused, in_loss)), _maxdiff(fused, in_loss)
    assert _maxdiff(fused, _run(make(0.0))) > 1e-3       # and the decay did something
    l2 = _run(make(0.0), l2_in_loss=LAM)
    assert _maxdiff(fused, l2) > 1e-4                     # and it is not L2


def test_decoupled_is_not_the_loss_term_under_adam():
    """The point of Loshchilov & Hutter: under Adam the L2 gradient wd*p is
    divided by sqrt(v) along with the loss gradient, decoupled decay is not,
    so AdamW(weight_decay=lambda) is not Adam on loss + lambda/2*||w||^2."""
    lr = 0.01
    in_loss = _run(lambda ps: fused_wd.Adam(ps, lr=lr), l2_in_loss=LAM)
    l2 = _run(lambda ps: fused_wd.Adam(ps, lr=lr, weight_decay=LAM))
    decoupled = _run(lambda ps: fused_wd.AdamW(ps, lr=lr, weight_decay=LAM))
    # the decoupled shrink is tiny here (1 - lr*lambda = 0.999 per step), so
    # compare it also with a lambda that makes the shrink as big as the L2 effect
    strong = _run(lambda ps: fused_wd.AdamW(ps, lr=lr, weight_decay=LAM / lr))
    assert _close(l2, in_loss, **FP32)
    for other in (decoupled, strong):
        assert _maxdiff(other, in_loss) > 1e-3, _maxdiff(other, in_loss)


def test_l2_under_adam_decays_large_gradient_weights_less():
    """Why they differ: with L2 under Adam, a weight whose loss gradient is
    large is decayed less (the decay term is normalized by sqrt(v)); decoupled
    decay shrinks every weight by the same factor."""
    p0 = torch.ones(2)
    grad = torch.tensor([10.0, 0.0])            # a weight with large gradients, one with none
    out = {}
    for mode in ("l2", "decoupled"):
        p = p0.clone().requires_grad_(True)
        opt = fused_wd.Adam([p], lr=0.01, weight_decay=0.5, weight_decay_mode=mode)
        for step in range(20):
            p.grad = grad * (1 if step % 2 == 0 else -1)   # zero-mean gradient: no net drift
            opt.step()
        out[mode] = p.detach()
    # decoupled: both weights shrink by the same 0.995**20 up to the Adam
    # update of the oscillating gradient, which is the same for both modes
    # on weight 0 and zero on weight 1
    assert out["decoupled"][1].item() == pytest.approx((1 - 0.01 * 0.5) ** 20, rel=1e-6)
    # l2: weight 1 (no loss gradient) is pulled down at full Adam speed (~lr per step),
    # weight 0's decay is drowned in sqrt(v) of its large gradient
    shrink_l2 = 1 - out["l2"]
    assert shrink_l2[1] > 0.15                    # ~ 20 * lr
    assert abs(shrink_l2[0]) < 0.5 * shrink_l2[1]


# ------------------------------------------------------------ (3) SGD: decoupled == L2 with lr folded in

@pytest.mark.parametrize("lr,wd", [(0.05, 0.1), (0.2, 0.5), (1e-3, 3.0)])
def test_sgd_decoupled_equals_l2_without_momentum(lr, wd):
    """Plain SGD: p - lr*(g + wd*p) = p*(1 - lr*wd) - lr*g, so
    SGD(weight_decay=wd, "decoupled") == SGD(weight_decay=wd, "l2") with the
    SAME wd (decoupled multiplies by lr itself), and "independent" equals them
    with wd_independent = lr*wd (lr constant: lr/initial_lr = 1). Equal to
    float32 rounding (the two orders of operations round differently)."""
    l2 = _run(lambda ps: fused_wd.SGD(ps, lr=lr, weight_decay=wd), steps=20)
    dec = _run(lambda ps: fused_wd.SGD(ps, lr=lr, weight_decay=wd, weight_decay_mode="decoupled"), steps=20)
    ind = _run(lambda ps: fused_wd.SGD(ps, lr=lr, weight_decay=lr * wd, weight_decay_mode="independent"),
               steps=20)
    in_loss = _run(lambda ps: fused_wd.SGD(ps, lr=lr), steps=20, l2_in_loss=wd)
    assert _close(dec, l2, **FP32_REORDERED), _maxdiff(dec, l2)
    assert _close(ind, l2, **FP32_REORDERED), _maxdiff(ind, l2)
    assert _close(dec, in_loss, **FP32_REORDERED), _maxdiff(dec, in_loss)
    assert _close(l2, in_loss, **FP32), _maxdiff(l2, in_loss)
    # not a tautology: the decay moved the params
    assert _maxdiff(l2, _run(lambda ps: fused_wd.SGD(ps, lr=lr), steps=20)) > 1e-4


def test_sgd_momentum_decoupled_differs_from_l2():
    """With momentum the L2 term goes through the momentum buffer (the decay
    of past steps keeps acting), the decoupled shrink does not: they differ."""
    l2 = _run(lambda ps: fused_wd.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.5), steps=20)
    dec = _run(lambda ps: fused_wd.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.5,
                                       weight_decay_mode="decoupled"), steps=20)
    assert _maxdiff(l2, dec) > 1e-3


# ------------------------------------------------------------ (4) decay is not clipped

@pytest.mark.parametrize("name,make,factor", [
    ("SGD-decoupled", lambda ps: fused_wd.SGD(ps, lr=0.1, weight_decay=2.0, weight_decay_mode="decoupled",
                                              max_grad_norm=1e-6), 1 - 0.1 * 2.0),
    ("SGD-l2", lambda ps: fused_wd.SGD(ps, lr=0.1, weight_decay=2.0, max_grad_norm=1e-6), 1 - 0.1 * 2.0),
    # eps=1 makes Adam's update of the ~1e-7 clipped gradient negligible (~lr*1e-7)
    ("AdamW-decoupled", lambda ps: fused_wd.AdamW(ps, lr=0.1, weight_decay=2.0, eps=1.0,
                                                  max_grad_norm=1e-6), 1 - 0.1 * 2.0),
    ("AdamW-independent", lambda ps: fused_wd.AdamW(ps, lr=0.1, weight_decay=0.3, eps=1.0,
                                                    weight_decay_mode="independent",
                                                    max_grad_norm=1e-6), 1 - 0.3),
], ids=lambda x: x if isinstance(x, str) else "")
def test_decay_is_not_clipped(name, make, factor):
    """Clipping scales the loss gradient only, before the decay: with a tiny
    max_grad_norm and a big weight decay the step is the full decay
    (p*(1 - lr*wd) decoupled; p - lr*wd*p for L2), not a clipped one."""
    init, data = _problem()
    params = [p.clone().requires_grad_(True) for p in init]
    opt = make(params)
    loss = _loss(params, data)
    loss.backward()
    true_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    opt.step()
    assert opt.last_grad_norm.item() == pytest.approx(true_norm.item(), rel=1e-5)
    assert true_norm.item() > 0.1                 # so the clip coefficient is ~1e-6/N, tiny
    for p, p0 in zip(params, init):
        torch.testing.assert_close(p.detach(), p0 * factor, rtol=1e-6, atol=1e-6)
        # a clipped decay would have left p almost where it was
        assert (p.detach() - p0).abs().max().item() > 0.1 * p0.abs().max().item()


# ------------------------------------------------------------ (1) the example study

def test_study_end_to_end_on_synthetic_data(tmp_path):
    """The example's functions on a tiny configuration and synthetic data
    (no scikit-learn): the study runs, and every decay mode ends with a
    smaller weight norm than no decay."""
    study = _study()
    torch.set_num_threads(1)
    cfg = study.tiny_config()
    data = study.synthetic_data(n_train=64, n_test=128, seed=0)
    summary = study.run_study(cfg, str(tmp_path), data=data, plots=False, progress=None)

    assert set(summary["sweep"]) == set(study.SWEPT)
    for mode, cell in summary["sweep"].items():
        family = "sgd" if mode == "sgd_l2" else "adam"
        assert len(cell["test_acc"]) == len(cfg.lrs[family])
        assert all(len(row) == 1 + len(cfg.wds[mode]) for row in cell["test_acc"])
        assert all(0.0 <= a <= 1.0 for row in cell["test_acc"] for a in row)
    assert os.path.exists(tmp_path / "summary.json")
    for pair in summary["clipping"].values():
        assert pair["clipped"]["max_grad_norm"] == cfg.clip_norm

    # decay shrinks the weight norm, every mode, against the same run without decay
    for mode in study.SWEPT:
        family = "sgd" if mode == "sgd_l2" else "adam"
        lr, wd = cfg.ref_lr[family], cfg.wds[mode][-1]
        base_mode = "sgd_l2" if mode == "sgd_l2" else "none"
        base = study.train(data, base_mode, lr, 0.0, cfg, record=False)
        decayed = study.train(data, mode, lr, wd, cfg)
        assert decayed["weight_norm"] < 0.95 * base["weight_norm"], (mode, decayed["weight_norm"],
                                                                      base["weight_norm"])
        h = decayed["history"]
        assert len(h["weight_norm"]) == cfg.steps // cfg.eval_every + 1
        assert len(decayed["grad_norm"]) == cfg.steps
        assert all(math.isfinite(x) for x in decayed["grad_norm"])

    # sparsity: L2 leaves no weight exactly zero, proximal L1 does, more with
    # a larger wd, and every run is accounted for (wd = 0 first)
    assert set(summary["sparsity"]) == set(study.SPARSE)
    for mode, c in summary["sparsity"].items():
        assert c["wds"] == [0.0] + list(cfg.sparse_wds[mode])
        assert len(c["test_acc"]) == len(c["zero_fraction"]) == len(c["wds"])
        assert all(0.0 <= z <= 1.0 for z in c["zero_fraction"])
    assert summary["sparsity"]["adam_l2"]["zero_fraction"] == [0.0] * len(cfg.sparse_wds["adam_l2"]) + [0.0]
    prox = summary["sparsity"]["l1_proximal"]["zero_fraction"]
    assert prox[0] == 0.0 and 0.0 < prox[1] < prox[-1]

    # fixed seeds: the same run twice gives the same numbers
    a = study.train(data, "adamw", 1e-2, 3.0, cfg)
    b = study.train(data, "adamw", 1e-2, 3.0, cfg)
    assert a["history"] == b["history"] and a["grad_norm"] == b["grad_norm"]


def test_study_plots(tmp_path):
    """The plots are written (needs matplotlib, in the `examples` extra)."""
    pytest.importorskip("matplotlib")
    study = _study()
    data = study.synthetic_data(n_train=64, n_test=128, seed=1)
    summary = study.run_study(study.tiny_config(), str(tmp_path), data=data, progress=None)
    for name in summary["files"].values():
        assert (tmp_path / name).stat().st_size > 1000


def test_study_helpers():
    study = _study()
    cell = {"lrs": [1e-3, 1e-2], "wds": [0.0, 0.1, 1.0],
            "test_acc": [[0.5, 0.9, 0.6], [0.5, 0.6, 0.9]]}
    assert study.best_wd_per_lr(cell) == [0.1, 1.0]
    assert study.ridge_drift(cell) == pytest.approx(1.0)
    assert study.best_setting(cell) == (1e-3, 0.1, 0.9)
    assert study.interaction_share([[1.0, 2.0], [2.0, 3.0]]) == pytest.approx(0.0, abs=1e-12)
    assert study.interaction_share([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(1.0)
