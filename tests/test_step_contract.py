"""What a step promises besides its math: it reads no tensor back to the
host (so a CUDA step never waits for the device), it follows in-place
changes of tensor hyperparameters, and stochastic rounding keeps its key
advancing past 2^24 steps."""
import contextlib
from unittest import mock

import pytest
import torch

import fused_wd
from conftest import clone_leaves, make_grads, make_params

HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist")


@contextlib.contextmanager
def no_host_reads():
    """Fails on any Python-level read of a tensor's value."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host inside step()")

    with contextlib.ExitStack() as stack:
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse))
        yield


def t(x):
    return torch.tensor(x, dtype=torch.float64)


CASES = {
    "adamw_tensor_betas_independent": (
        fused_wd.AdamW, dict(lr=t(0.01), betas=(t(0.9), t(0.99)), eps=t(1e-8), weight_decay=t(0.1),
                             weight_decay_mode="independent", max_grad_norm=1.0, amsgrad=True),
        dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
             weight_decay_mode="independent", max_grad_norm=1.0, amsgrad=True)),
    "sgd_tensor_momentum": (
        fused_wd.SGD, dict(lr=t(0.05), momentum=t(0.9), dampening=t(0.1), weight_decay=t(0.01),
                           max_grad_norm=0.5),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, max_grad_norm=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_reads_nothing_back_and_follows_in_place_changes(case):
    cls, tensor_hp, float_hp = CASES[case]
    ps = make_params(torch.float32, "cpu")
    a, b = clone_leaves(ps), clone_leaves(ps)
    opt_t, opt_f = cls(a, **tensor_hp), cls(b, **float_hp)
    for step in range(6):
        for xs in (a, b):
            for p, g in zip(xs, make_grads(xs, step)):
                p.grad = g
        if step == 3:  # an in-place change, seen by the next step
            group_t, group_f = opt_t.param_groups[0], opt_f.param_groups[0]
            if "betas" in group_t:
                group_t["betas"][0].fill_(0.5)
                group_f["betas"] = (0.5, group_f["betas"][1])
            else:
                group_t["momentum"].fill_(0.5)
                group_f["momentum"] = 0.5
        opt_f.step()
        if step in (0, 3):
            opt_t.step()  # reads each tensor hyperparameter: the first time, and after the change
        else:
            with no_host_reads():
                opt_t.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_stochastic_rounding_counts_steps_in_float64():
    """The step counter of a stochastically rounded param is float64, so the
    rounding key advances past 2^24; a float32 counter from a torch
    checkpoint is carried over."""
    p = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    ref = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())])
    ref.param_groups[0]["params"][0].grad = torch.ones(64, dtype=torch.bfloat16)
    ref.step()
    opt = fused_wd.AdamW([p], stochastic_rounding=True)
    opt.load_state_dict(ref.state_dict())
    p.grad = torch.ones(64, dtype=torch.bfloat16)
    opt.step()
    step = opt.state[p]["step"]
    assert step.dtype == torch.float64 and float(step) == 2.0
    step.fill_(2.0 ** 24)
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0 ** 24 + 1
    plain = torch.nn.Parameter(torch.randn(8))
    opt2 = fused_wd.AdamW([plain], stochastic_rounding=True)  # fp32: no rounding, torch's counter
    plain.grad = torch.ones(8)
    opt2.step()
    assert opt2.state[plain]["step"].dtype == torch.float32


@pytest.mark.parametrize("cls", [fused_wd.AdamW, fused_wd.SGD])
def test_a_step_that_raises_changes_nothing(cls):
    """A bad state in the last param group is found before the first
    group's kernel runs: every param and state tensor keeps its bits."""
    ps = make_params(torch.float32, "cpu")
    params = clone_leaves(ps)
    kw = dict(momentum=0.9) if cls is fused_wd.SGD else {}
    opt = cls([{"params": params[:3]}, {"params": params[3:]}], lr=0.1, max_grad_norm=1.0, **kw)
    for step in range(2):
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g
        opt.step()
    before = {id(t): t.clone() for p in params for t in [p] + list(opt.state[p].values())
              if isinstance(t, torch.Tensor)}
    last = params[-1]
    key = "momentum_buffer" if cls is fused_wd.SGD else "exp_avg"
    opt.state[last][key] = torch.zeros(last.numel() + 1)
    with pytest.raises(RuntimeError, match=key):
        opt.step()
    for p in params:
        for t in [p] + [v for k, v in opt.state[p].items() if not (p is last and k == key)]:
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, before[id(t)])


def test_unsupported_param_dtype_is_refused_before_any_update():
    good = torch.nn.Parameter(torch.randn(4))
    bad = torch.nn.Parameter(torch.randn(4).to(torch.float8_e4m3fn), requires_grad=False)
    bad.grad = torch.zeros(4).to(torch.float8_e4m3fn)
    good.grad = torch.ones(4)
    before = good.detach().clone()
    opt = fused_wd.AdamW([{"params": [good]}, {"params": [bad]}], lr=0.1)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state[good]) == 0


# step() skips torch.optim's step wrapper when it would do nothing (no hook,
# no profiler, no compiler): what the wrapper does must still happen whenever
# it has something to do.

def _tiny_opt(cls=fused_wd.AdamW):
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 0.5)
    return p, cls([p], lr=0.1)


@pytest.mark.parametrize("cls", [fused_wd.AdamW, fused_wd.SGD])
def test_step_hooks_run_in_order_and_may_replace_the_arguments(cls):
    p, opt = _tiny_opt(cls)
    seen = []

    def pre(o, args, kwargs):
        seen.append(("pre", o is opt, p.detach().clone()))
        return args, {"closure": lambda: torch.tensor(7.0)}

    def post(o, args, kwargs):
        seen.append(("post", o is opt, p.detach().clone()))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    assert opt.step() == 7.0  # the pre hook's closure ran
    assert [(k, same) for k, same, _ in seen] == [("pre", True), ("post", True)]
    assert torch.equal(seen[0][2], torch.ones(4)) and not torch.equal(seen[1][2], torch.ones(4))
    for h in handles:
        h.remove()
    seen.clear()
    opt.step()
    assert seen == []


def test_global_step_hooks_run():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    p, opt = _tiny_opt()
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append("pre")),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append("post"))]
    try:
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert seen == ["pre", "post"]


def test_the_profiler_sees_the_step():
    p, opt = _tiny_opt()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#AdamW.step" in names
    assert any(n.startswith("fused_wd::adam_") for n in names)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_step_restores_the_grad_mode_and_runs_the_closure_with_grad(grad_enabled):
    p, opt = _tiny_opt()
    modes = []

    def closure():
        modes.append(torch.is_grad_enabled())
        return torch.tensor(1.0)

    with torch.set_grad_enabled(grad_enabled):
        opt.step(closure)
        assert torch.is_grad_enabled() is grad_enabled
        p.grad = torch.ones(4).to_sparse()  # a sparse grad: the step raises
        with pytest.raises(RuntimeError):
            opt.step()
        assert torch.is_grad_enabled() is grad_enabled
    assert modes == [True]
    # the step itself ran without grad: the param stays a leaf with no history
    assert p.grad_fn is None and p.is_leaf
