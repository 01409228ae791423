"""The step plan (fused_wd/optim.py, _StepPlan): a param group's validated
params, states and op lists are kept and reused while nothing they depend on
changed. Each change that must rebuild it is followed by a step that must
equal torch.optim's; errors still name the list, the index or the parameter;
a step that raises still changes nothing; and the plan really is reused (a
count of plan builds, not a timing)."""
import copy

import pytest
import torch

import fused_wd
from conftest import DEVICES, TOL, clone_leaves, make_grads, make_params

SHAPES = [(6, 5), (7,), (), (3, 2, 2)]
HYPER = dict(lr=0.01, weight_decay=0.1)


def make_pair(device="cpu", cls=fused_wd.AdamW, ref=torch.optim.AdamW, **kw):
    """Twin params for fused_wd and for torch.optim (for-loop), and their
    optimizers."""
    ps = make_params(torch.float32, device, shapes=SHAPES)
    a, b = clone_leaves(ps), clone_leaves(ps)
    kw = dict(HYPER, **kw)
    return a, b, cls(a, **kw), ref(b, foreach=False, **kw)


def give_grads(xs, step, fresh=True):
    for p, g in zip(xs, make_grads(xs, step)):
        if fresh or p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def step_both(a, b, opt_a, opt_b, step, fresh=True):
    give_grads(a, step, fresh)
    give_grads(b, step, fresh)
    opt_a.step()
    opt_b.step()


def stepped_pair(steps, fresh=True):
    """make_pair's twins after `steps` steps of both."""
    a, b, opt_a, opt_b = make_pair()
    for step in range(steps):
        step_both(a, b, opt_a, opt_b, step, fresh)
    return a, b, opt_a, opt_b


def assert_same(opt_a, opt_b):
    ps_a = [p for g in opt_a.param_groups for p in g["params"]]
    ps_b = [p for g in opt_b.param_groups for p in g["params"]]
    assert len(ps_a) == len(ps_b)
    for p, q in zip(ps_a, ps_b):
        torch.testing.assert_close(p, q, **TOL[p.dtype])
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert set(sb) <= set(sa)
        for k, v in sb.items():  # a step counter may live on another device
            torch.testing.assert_close(sa[k].float().cpu(), v.float().cpu(), **TOL[torch.float32])


def assert_step_refused(opt, xs, match):
    """opt.step() raises a RuntimeError matching `match` and leaves the
    params xs as they were."""
    before = [p.detach().clone() for p in xs]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for p, q in zip(xs, before):
        assert torch.equal(p, q)


def builds(opt):
    return opt.__dict__.get("_plan_builds", 0)


# ------------------------------------------------------------ reuse


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grads", "grads_kept"])
@pytest.mark.parametrize("cls,ref,kw", [
    (fused_wd.AdamW, torch.optim.AdamW, {}),
    (fused_wd.Adam, torch.optim.Adam, {}),
    (fused_wd.SGD, torch.optim.SGD, dict(momentum=0.9)),
], ids=["adamw", "adam", "sgd_momentum"])
def test_plan_is_built_once_and_reused(cls, ref, kw, fresh):
    a, b, opt_a, opt_b = make_pair(cls=cls, ref=ref, **kw)
    for step in range(5):
        step_both(a, b, opt_a, opt_b, step, fresh)
    assert_same(opt_a, opt_b)
    # SGD's first step creates its momentum buffers (set to the grad, once):
    # its lists are not kept, the second step builds the plan that stays
    assert builds(opt_a) == (2 if cls is fused_wd.SGD else 1)


def test_clipped_multi_group_plan_is_reused_and_matches_torch():
    ps = make_params(torch.float32, "cpu", shapes=SHAPES)
    a, b = clone_leaves(ps), clone_leaves(ps)
    opt_a = fused_wd.AdamW([{"params": a[:2]}, {"params": a[2:], "weight_decay": 0.0}],
                           max_grad_norm=0.5, **HYPER)
    opt_b = torch.optim.AdamW([{"params": b[:2]}, {"params": b[2:], "weight_decay": 0.0}],
                              foreach=False, **HYPER)
    for step in range(4):
        give_grads(a, step)
        give_grads(b, step)
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        opt_a.step()
        opt_b.step()
    assert_same(opt_a, opt_b)
    assert builds(opt_a) == 2  # one per group


# ------------------------------------------------------------ invalidation


def change_replace_param(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        new = torch.nn.Parameter(torch.full_like(xs[1], 0.5))
        opt.param_groups[0]["params"][1] = new
        xs[1] = new


def change_replace_state(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        opt.state[xs[0]]["exp_avg"] = torch.full_like(xs[0], 0.25)
        opt.state[xs[2]]["step"] = torch.tensor(7.0)


def change_reset_state(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        opt.state[xs[3]] = {}


def change_load_state_dict(a, b, opt_a, opt_b):
    """Both load the state of a third optimizer trained on other grads."""
    c = clone_leaves(b)
    other = torch.optim.AdamW(c, foreach=False, **HYPER)
    for step in range(3):
        give_grads(c, 100 + step)
        other.step()
    sd = other.state_dict()
    opt_a.load_state_dict(copy.deepcopy(sd))  # load_state_dict may keep the tensors it is given
    opt_b.load_state_dict(copy.deepcopy(sd))


def change_add_param_group(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        new = torch.nn.Parameter(torch.linspace(-1, 1, 9))
        opt.add_param_group({"params": [new], "lr": 0.05})
        xs.append(new)


def change_tensor_lr(a, b, opt_a, opt_b):
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["lr"] = torch.tensor(0.02)


def change_capturable(a, b, opt_a, opt_b):
    opt_a.param_groups[0]["capturable"] = True


def change_param_loses_grad(a, b, opt_a, opt_b):
    """The next step has no grad for param 1 (both skip it)."""
    a[1].requires_grad_(False)
    b[1].requires_grad_(False)


def change_params_list_grows(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        new = torch.nn.Parameter(torch.linspace(-2, 2, 5))
        opt.param_groups[0]["params"].append(new)
        xs.append(new)


def change_same_data_new_storage(a, b, opt_a, opt_b):
    """p.data swapped for a copy elsewhere in memory: same param object,
    new data pointer."""
    for xs in (a, b):
        xs[0].data = xs[0].data.clone()


def change_state_by_update(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        opt.state[xs[0]].update(exp_avg=torch.full_like(xs[0], 0.25))


def change_state_by_pop_and_setdefault(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        st = opt.state[xs[2]]
        st.setdefault("exp_avg_sq", st.pop("exp_avg_sq").clone().fill_(0.5))


def change_state_by_or(a, b, opt_a, opt_b):
    for xs, opt in ((a, opt_a), (b, opt_b)):
        st = opt.state[xs[1]]
        st |= {"exp_avg": torch.full_like(xs[1], -0.5)}


def change_reset_state_then_edit_it(a, b, opt_a, opt_b):
    """A plain dict stored as a param's state and edited afterwards (after a
    step has used it): the edit is seen."""
    for xs, opt in ((a, opt_a), (b, opt_b)):
        opt.state[xs[3]] = {}
    for opt in (opt_a, opt_b):
        opt.step()
    for xs, opt in ((a, opt_a), (b, opt_b)):
        opt.state[xs[3]]["exp_avg"] = torch.full_like(xs[3], 0.75)


CHANGES = {f.__name__[len("change_"):]: f for f in (
    change_replace_param, change_replace_state, change_reset_state, change_load_state_dict,
    change_add_param_group, change_tensor_lr, change_capturable, change_param_loses_grad,
    change_params_list_grows, change_same_data_new_storage, change_state_by_update,
    change_state_by_pop_and_setdefault, change_state_by_or,
    change_reset_state_then_edit_it)}


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grads", "grads_kept"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_change_then_step_matches_torch(change, fresh):
    a, b, opt_a, opt_b = stepped_pair(3, fresh)
    before = builds(opt_a)
    CHANGES[change](a, b, opt_a, opt_b)
    for step in range(3, 6):
        for xs in (a, b):
            for p, g in zip(xs, make_grads(xs, step)):
                if not p.requires_grad:
                    p.grad = None
                elif fresh or p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
        opt_a.step()
        opt_b.step()
        assert_same(opt_a, opt_b)
    rebuilt = builds(opt_a) - before
    if change == "same_data_new_storage":
        assert rebuilt == 0  # the op reads data pointers each call: nothing to rebuild
    else:
        assert rebuilt >= 1


# ------------------------------------------------------------ the steady step
#
# A step that repeats the last one (every plan holds, the ops read the
# params' own grads, no scaler, hooks or statistics) keeps that step's op
# calls and arguments (fused_wd/optim.py, _Steady): a changed option must
# end it, except a float lr, which it passes on.


def steady_steps(opt):
    return opt.__dict__.get("_steady_steps", 0)


def set_option(key, value):
    def change(opt_a, opt_b):
        for opt in (opt_a, opt_b):
            opt.param_groups[0][key] = value
    return change


OPTION_CHANGES = {
    "lr": set_option("lr", 0.03),
    "weight_decay": set_option("weight_decay", 0.3),
    "betas": set_option("betas", (0.8, 0.99)),
    "eps": set_option("eps", 1e-3),
    "maximize": set_option("maximize", True),
    "new_key": set_option("note", "a key the step does not read"),
}


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grads", "grads_kept"])
@pytest.mark.parametrize("change", list(OPTION_CHANGES))
def test_option_change_then_steady_step_matches_torch(change, fresh):
    a, b, opt_a, opt_b = stepped_pair(3, fresh)
    # the first step builds the plans, the second repeats them and keeps its calls
    assert steady_steps(opt_a) == 1
    OPTION_CHANGES[change](opt_a, opt_b)
    for step in range(3, 6):
        step_both(a, b, opt_a, opt_b, step, fresh)
        assert_same(opt_a, opt_b)
    # a new lr goes on steadily; any other change takes the full step once
    assert steady_steps(opt_a) == (4 if change == "lr" else 3)


# SGD's first step makes its momentum buffers (its plan is kept from the
# second step on), so its steady steps begin one step later.
@pytest.mark.parametrize("cls,ref,kw,steady", [
    (fused_wd.AdamW, torch.optim.AdamW, {}, 4),
    (fused_wd.SGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True), 3),
], ids=["adamw", "sgd_nesterov"])
def test_steady_clipped_steps_follow_a_scheduler(cls, ref, kw, steady):
    a, b, opt_a, opt_b = make_pair(cls=cls, ref=ref, **kw)
    opt_a.param_groups[0]["max_grad_norm"] = 0.5
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)) for opt in (opt_a, opt_b)]
    for step in range(6):
        give_grads(a, step)
        give_grads(b, step)
        norm = torch.nn.utils.clip_grad_norm_(b, 0.5)
        opt_a.step()
        opt_b.step()
        for sched in scheds:
            sched.step()
        assert_same(opt_a, opt_b)
        torch.testing.assert_close(opt_a.last_grad_norm, norm, **TOL[torch.float32])
    assert steady_steps(opt_a) == steady


def test_steady_step_keeps_no_mutable_option():
    """betas set as a list, then edited in place (no identity changes):
    every step from then on takes the full way and sees the edit."""
    a, b, opt_a, opt_b = make_pair()
    for step in range(5):
        if step == 2:
            for opt in (opt_a, opt_b):
                opt.param_groups[0]["betas"] = [0.9, 0.999]
        if step == 3:
            for opt in (opt_a, opt_b):
                opt.param_groups[0]["betas"][1] = 0.9
        step_both(a, b, opt_a, opt_b, step)
        assert_same(opt_a, opt_b)
    assert steady_steps(opt_a) == 0


def test_steady_step_error_names_the_group_and_changes_nothing():
    """A state tensor resized in place changes no identity: the steady step
    runs, its op refuses the shape, and nothing was written."""
    a, b, opt_a, opt_b = stepped_pair(3)
    assert steady_steps(opt_a) == 1
    opt_a.state[a[1]]["exp_avg"].resize_(3)
    give_grads(a, 3)
    assert_step_refused(opt_a, a, r"fused_wd.AdamW, param group 0: .*exp_avgs\[1\] has shape")
    assert steady_steps(opt_a) == 1


def test_momentum_switched_on_rebuilds_the_sgd_plan():
    a, b, opt_a, opt_b = make_pair(cls=fused_wd.SGD, ref=torch.optim.SGD)
    for step in range(3):
        step_both(a, b, opt_a, opt_b, step)
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["momentum"] = 0.9
    for step in range(3, 6):
        step_both(a, b, opt_a, opt_b, step)
    assert_same(opt_a, opt_b)


def test_param_redtyped_is_seen():
    """A param re-dtyped in place (p.data = ...) with fp32 states: the plan
    is rebuilt, and the step refuses the states as it does without a plan
    (the CPU kernels would accept fp32 states for a bf16 param)."""
    a, b, opt_a, opt_b = make_pair()
    for step in range(2):
        step_both(a, b, opt_a, opt_b, step)
    a[0].data = a[0].data.to(torch.bfloat16)
    give_grads(a, 2)
    assert_step_refused(opt_a, a, r"'exp_avg' .*dtype torch.float32.*bfloat16")


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_param_moved_to_another_device(device):
    a, b, opt_a, opt_b = make_pair()
    for step in range(2):
        step_both(a, b, opt_a, opt_b, step)
    for xs, opt in ((a, opt_a), (b, opt_b)):
        for p in xs:
            p.data = p.data.to(device)
            p.grad = None
            for k, v in opt.state[p].items():
                opt.state[p][k] = v.to(device) if k != "step" or opt is opt_a else v
    for step in range(2, 4):
        step_both(a, b, opt_a, opt_b, step)
    assert_same(opt_a, opt_b)


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grads", "grads_kept"])
@pytest.mark.parametrize("bad,match", [
    ("dtype", r"param group 1: a parameter of shape \(3, 2, 2\) and dtype torch.float32 has a "
              r"grad of shape \(3, 2, 2\) and dtype torch.float64"),
    ("sparse", r"does not support sparse gradients \(param group 1, shape \(7,\)\)"),
])
def test_bad_grad_after_reuse_names_it_and_changes_nothing(bad, match, fresh):
    """Plans of both groups exist; a bad grad in the last group is refused
    before the first group's kernel runs."""
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=SHAPES))
    opt = fused_wd.AdamW([{"params": ps[:1]}, {"params": ps[1:]}], max_grad_norm=1.0, **HYPER)
    for step in range(2):
        give_grads(ps, step, fresh)
        opt.step()
    give_grads(ps, 2, fresh)
    if bad == "dtype":
        if not hasattr(ps[3], "grad_dtype"):
            pytest.skip("this torch cannot give a param a grad of another dtype")
        ps[3].grad_dtype = None  # torch >= 2.10 lets a grad's dtype differ when asked
        ps[3].grad = ps[3].grad.double()
    else:
        ps[1].grad = ps[1].grad.to_sparse()
    before = {id(t): t.clone() for p in ps for t in [p] + list(opt.state[p].values())}
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for p in ps:
        for t in [p] + list(opt.state[p].values()):
            assert torch.equal(t, before[id(t)])


def test_replaced_bad_state_after_reuse_names_it_and_changes_nothing():
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=SHAPES))
    opt = fused_wd.SGD([{"params": ps[:2]}, {"params": ps[2:]}], momentum=0.9, **HYPER)
    for step in range(3):
        give_grads(ps, step)
        opt.step()
    give_grads(ps, 3)
    before = {id(t): t.clone() for p in ps for t in [p] + list(opt.state[p].values())}
    opt.state[ps[3]]["momentum_buffer"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"param group 1: optimizer state 'momentum_buffer' "
                                           r"has shape \(5,\)"):
        opt.step()
    for p in ps[:3]:
        for t in [p] + list(opt.state[p].values()):
            assert torch.equal(t, before[id(t)])
    assert torch.equal(ps[3], before[id(ps[3])])


@pytest.mark.parametrize("bad", ["state", "grad"])
def test_kernel_error_names_list_and_index(bad):
    """What the plan's checks leave to the op (a state or grad resized in
    place keeps its identity) is refused by the op before it writes, naming
    the list and index."""
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=SHAPES))
    opt = fused_wd.AdamW(ps, **HYPER)
    for step in range(2):
        give_grads(ps, step)
        opt.step()
    give_grads(ps, 2)
    if bad == "state":
        opt.state[ps[1]]["exp_avg_sq"].resize_(8)
        match = r"exp_avg_sqs\[1\] has shape \[8\] but params\[1\] has shape \[7\]"
    else:  # the grad setter refuses another shape: changed in place
        ps[3].grad.resize_(12)
        match = r"grads\[3\] has shape \[12\] but params\[3\] has shape \[3, 2, 2\]"
    before = {id(t): t.clone() for p in ps for t in [p] + list(opt.state[p].values())}
    with pytest.raises(RuntimeError, match=r"param group 0: fused_wd.adam_: " + match):
        opt.step()
    for p in ps:
        for t in [p] + list(opt.state[p].values()):
            assert torch.equal(t, before[id(t)])


# ------------------------------------------------- the params' own grads
#
# Once every group's plan holds and grads_ready accepts the grads, the ops
# read each param's grad themselves (no grad is touched in Python).


def spy_own_grads(monkeypatch):
    """Records, per update op call, whether the op read the params' own
    grads (lists.grads None)."""
    seen = []
    for cls in (fused_wd.optim._AdamBase, fused_wd.SGD):
        op = cls._op

        def spy(lists, *args, _op=op, **kw):
            seen.append(lists.grads is None)
            return _op(lists, *args, **kw)

        monkeypatch.setattr(cls, "_op", staticmethod(spy))
    return seen


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grads", "grads_kept"])
@pytest.mark.parametrize("cls,ref,kw", [
    (fused_wd.AdamW, torch.optim.AdamW, dict(max_grad_norm=0.5)),
    (fused_wd.Adam, torch.optim.Adam, dict(amsgrad=True)),
    (fused_wd.SGD, torch.optim.SGD, dict(momentum=0.9, max_grad_norm=0.5)),
], ids=["adamw_clip", "adam_amsgrad", "sgd_momentum_clip"])
def test_kept_plans_read_the_params_own_grads(monkeypatch, cls, ref, kw, fresh):
    seen = spy_own_grads(monkeypatch)
    ps = make_params(torch.float32, "cpu", shapes=SHAPES)
    a, b = clone_leaves(ps), clone_leaves(ps)
    clip = kw.pop("max_grad_norm", None)
    opt_a = cls([{"params": a[:2]}, {"params": a[2:], "weight_decay": 0.0}], max_grad_norm=clip, **HYPER, **kw)
    opt_b = ref([{"params": b[:2]}, {"params": b[2:], "weight_decay": 0.0}], foreach=False, **HYPER, **kw)
    for step in range(5):
        give_grads(a, step, fresh)
        give_grads(b, step, fresh)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(b, clip)
        opt_a.step()
        opt_b.step()
    assert_same(opt_a, opt_b)
    # two calls per step (one per group); the plans hold from the step after
    # the one that built them (SGD builds its momentum buffers first), and
    # the steps after that repeat it (the steady step calls the ops itself,
    # with the params' own grads)
    first = 2 if cls is fused_wd.SGD else 1
    assert steady_steps(opt_a) == 5 - first - 1
    assert seen == [False] * (2 * first) + [True] * 2


def test_own_grads_follow_grad_changes(monkeypatch):
    """A param whose grad is gone takes the checked path (the op gets a list
    of grads); a non-contiguous grad, or one replaced by a new tensor, is
    read from the param as it is; every step equals torch's."""
    seen = spy_own_grads(monkeypatch)
    a, b, opt_a, opt_b = make_pair()
    for step in range(2):
        step_both(a, b, opt_a, opt_b, step)
    assert seen == [False, True]
    give_grads(a, 2)
    give_grads(b, 2)
    a[1].grad = b[1].grad = None
    opt_a.step()
    opt_b.step()
    assert_same(opt_a, opt_b)
    assert seen[-1] is False
    for step in (3, 4):
        give_grads(a, step)
        give_grads(b, step)
        for xs in (a, b):  # the (6, 5) grad as a transposed view
            xs[0].grad = xs[0].grad.t().contiguous().t()
        assert not a[0].grad.is_contiguous()
        opt_a.step()
        opt_b.step()
        assert_same(opt_a, opt_b)
    assert seen[-1] is True


@pytest.mark.parametrize("dtype", list(fused_wd._ops.SCALAR_TYPE_CODES))
def test_scalar_type_codes_name_their_dtypes(dtype):
    p = torch.ones(3, dtype=dtype)
    p.grad = torch.ones(3, dtype=dtype)
    for other, code in fused_wd._ops.SCALAR_TYPE_CODES.items():
        assert fused_wd._ops.grads_ready([p], [code]) is (other == dtype)


def test_grads_ready_and_grads_from_params_at_the_op():
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=SHAPES))
    codes = [fused_wd._ops.SCALAR_TYPE_CODES[torch.float32]] * len(ps)

    def ready():
        return fused_wd._ops.grads_ready(ps, codes)

    assert not ready()  # no grads yet
    give_grads(ps, 0)
    assert ready()
    ps[2].grad = ps[2].grad.to_sparse()
    assert not ready()
    give_grads(ps, 0)
    if hasattr(ps[3], "grad_dtype"):
        ps[3].grad_dtype = None
        ps[3].grad = ps[3].grad.double()
        assert not ready()
        ps[3].grad = ps[3].grad.float()
    assert ready()
    with pytest.raises(RuntimeError, match="3 dtypes for 4 params"):
        fused_wd._ops.grads_ready(ps, codes[1:])
    ps[1].grad = None
    n = len(ps)
    hyper = dict(lr=0.1, lr_tensor=None, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                 decay_mode=1, cautious_wd=False, initial_lr=1.0, amsgrad=False, maximize=False,
                 grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
                 stochastic_rounding=False, sr_seed=0)
    states = dict(exp_avgs=[torch.zeros_like(p) for p in ps], exp_avg_sqs=[torch.zeros_like(p) for p in ps],
                  max_exp_avg_sqs=[], state_steps=[torch.zeros(()) for _ in ps], master_params=[],
                  sr_ids=[])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"params\[1\] \(shape \[7\]\) has no grad"):
        torch.ops.fused_wd.adam_(params=ps, grads=[], grads_from_params=True, **states, **hyper)
    with torch.no_grad(), pytest.raises(RuntimeError, match="grads must be empty with grads_from_params=True"):
        torch.ops.fused_wd.adam_(params=ps, grads=[p.detach() for p in ps], grads_from_params=True,
                                 **states, **hyper)
    assert all(float(s) == 0.0 for s in states["state_steps"])
    give_grads(ps, 1)
    start = [p.detach().clone() for p in ps]
    twin = [p.detach().clone() for p in ps]
    twin_states = {k: [t.clone() for t in v] for k, v in states.items()}
    with torch.no_grad():
        torch.ops.fused_wd.adam_(params=ps, grads=[], grads_from_params=True, **states, **hyper)
        torch.ops.fused_wd.adam_(params=twin, grads=[p.grad for p in ps], **twin_states, **hyper)
    for x, y, x0 in zip(ps, twin, start):
        assert torch.equal(x.detach(), y) and (x.numel() == 0 or not torch.equal(y, x0))
    for k in ("exp_avgs", "exp_avg_sqs", "state_steps"):
        assert all(map(torch.equal, states[k], twin_states[k]))
    out_a = torch.zeros(n, dtype=torch.float64)
    out_b = torch.full((n,), 5.0, dtype=torch.float64)
    torch.ops.fused_wd.norm_partials_(tensors=[p.grad for p in ps], out=out_a, index=list(range(n)),
                                      norm_type=2.0)
    torch.ops.fused_wd.norm_partials_(tensors=ps, out=out_b, index=list(range(n)), norm_type=2.0,
                                      of_grads=True)
    assert torch.equal(out_a, out_b) and bool((out_a > 0).all())


def sgd_kwargs(ps, bufs):
    return dict(params=ps, grads=[], momentum_buffers=bufs, buffer_is_new=[False] * len(ps), master_params=[],
                state_steps=[], grads_from_params=True, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                weight_decay=0.01, decay_mode=0)


def test_kept_call_is_the_op_call_and_checks_what_it_keeps():
    """torch.classes.fused_wd.KeptCall (the steady step's op calls): run(lr,
    grad_norm) gives the bits of calling the op with the kept arguments; a
    name the op lacks, a value of another type than the schema's, or an
    argument never given is an error naming it; with check_grads, a grad
    grads_ready refuses makes run return False and write nothing."""
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=SHAPES))
    give_grads(ps, 0)
    twin = [p.detach().clone() for p in ps]
    bufs = [torch.full_like(p, 0.5) for p in ps]
    twin_bufs = [b.clone() for b in bufs]
    kept = fused_wd._ops.kept_call("sgd_", sgd_kwargs(ps, bufs))
    with torch.no_grad():
        assert kept.run(0.05, None) is True
        torch.ops.fused_wd.sgd_(**dict(sgd_kwargs(twin, twin_bufs), grads=[p.grad for p in ps],
                                       grads_from_params=False, lr=0.05))
    assert all(map(torch.equal, [p.detach() for p in ps], twin)) and all(map(torch.equal, bufs, twin_bufs))

    with pytest.raises(TypeError, match="fused_wd.sgd_ has no argument 'betas'"):
        fused_wd._ops.kept_call("sgd_", dict(betas=(0.9, 0.99)))
    with pytest.raises(RuntimeError, match=r"sgd_'s argument 'momentum' is float, not what was given"):
        kept.integer("momentum", 1)
    with pytest.raises(RuntimeError, match=r"sgd_'s argument 'params' is Tensor\[\], not what"):
        kept.tensor("params", None)
    partial = fused_wd._ops.kept_call("sgd_", dict(params=ps, grads=[], momentum_buffers=bufs))
    with torch.no_grad(), pytest.raises(RuntimeError, match="sgd_ needs buffer_is_new, which was never given"):
        partial.run(0.05, None)

    codes = [fused_wd._ops.SCALAR_TYPE_CODES[torch.float32]] * len(ps)
    with pytest.raises(RuntimeError, match="3 dtypes for 4 params"):
        kept.check_grads(ps, codes[1:])
    kept.check_grads(ps, codes)
    ps[2].grad = None
    before = [t.clone() for t in [p.detach() for p in ps] + bufs]
    with torch.no_grad():
        assert kept.run(0.05, None) is False
    assert all(map(torch.equal, before, [p.detach() for p in ps] + bufs))


def test_same_items_compares_by_identity_only():
    """The plan's identity checks (fused_wd._C.same_items): a param replaced
    by an equal one is a change, and no tensor's __eq__ is called."""
    same = fused_wd._ext.C.same_items
    xs = [torch.nn.Parameter(torch.ones(1)) for _ in range(3)] + [torch.nn.Parameter(torch.ones(2, 2))]
    assert same(xs, list(xs)) and same(xs, tuple(xs)) and same((), [])
    twin = list(xs)
    twin[0] = torch.nn.Parameter(torch.ones(1))  # equal values, another object
    assert not same(xs, twin)
    twin = list(xs)
    twin[3] = torch.nn.Parameter(torch.ones(2, 2))  # == would raise on a 2x2 tensor
    assert not same(xs, twin)
    assert not same(xs, xs[:3])
    with pytest.raises(TypeError, match="two lists or tuples"):
        same(xs, iter(xs))


def test_param_replaced_in_the_params_list_is_seen():
    """group["params"][i] = another param (the same list object): the plan
    and the steady step end, and the new param is stepped as torch steps it."""
    a, b, opt_a, opt_b = stepped_pair(4)
    assert steady_steps(opt_a) == 2
    for xs, opt in ((a, opt_a), (b, opt_b)):
        xs[1] = torch.nn.Parameter(xs[1].detach().clone())
        opt.param_groups[0]["params"][1] = xs[1]
    # step 4 rebuilds the plan (the new param's state is made), 5 holds it,
    # 6 and 7 repeat it
    for step in (4, 5, 6, 7):
        step_both(a, b, opt_a, opt_b, step)
        assert_same(opt_a, opt_b)
        assert steady_steps(opt_a) == (2 if step < 6 else step - 3)


def test_steady_step_whose_grads_changed_takes_the_full_way():
    """Without clipping the steady step's first kept call checks the grads
    (no grads_ready op call of its own): a grad removed or re-dtyped after
    steady steps ends them, with torch's results."""
    a, b, opt_a, opt_b = stepped_pair(4)
    assert steady_steps(opt_a) == 2
    give_grads(a, 4)
    give_grads(b, 4)
    a[1].grad = b[1].grad = None
    opt_a.step()
    opt_b.step()
    assert_same(opt_a, opt_b)
    assert steady_steps(opt_a) == 2
    # the grads as before: a plan is built (5), held (6), then repeated (7)
    for step in (5, 6, 7):
        step_both(a, b, opt_a, opt_b, step)
        assert_same(opt_a, opt_b)
    assert steady_steps(opt_a) == 3


def test_update_ops_borrow_their_lists_and_refuse_grad_mode():
    """adam_, sgd_ and grads_ready borrow the tensors of their lists
    (csrc/common.h, boxed): no tensor's use count moves, whether the call
    succeeds or raises. Their Autograd kernel refuses, in grad mode, a
    tensor the op would write that requires grad, naming it; under no_grad
    (every step) it checks nothing."""
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=SHAPES))
    give_grads(ps, 0)
    n = len(ps)
    lists = dict(exp_avgs=[torch.zeros_like(p) for p in ps], exp_avg_sqs=[torch.zeros_like(p) for p in ps],
                 max_exp_avg_sqs=[], state_steps=[torch.zeros(()) for _ in ps], master_params=[], sr_ids=[])
    hyper = dict(lr=0.1, lr_tensor=None, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                 decay_mode=1, cautious_wd=False, initial_lr=1.0, amsgrad=False, maximize=False,
                 grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
                 stochastic_rounding=False, sr_seed=0)
    bufs = [torch.zeros_like(p) for p in ps]
    sgd = dict(momentum_buffers=bufs, buffer_is_new=[True] * n, master_params=[], state_steps=[], sr_ids=[],
               lr=0.1, lr_tensor=None, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
               decay_mode=0, cautious_wd=False, initial_lr=1.0, maximize=False, grad_norm=None,
               max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True,
               stochastic_rounding=False, sr_seed=0)
    every = ps + [p.grad for p in ps] + bufs + [t for v in lists.values() if isinstance(v, list) for t in v
                                                 if isinstance(t, torch.Tensor)]
    counts = [t._use_count() for t in every]
    codes = [fused_wd._ops.SCALAR_TYPE_CODES[torch.float32]] * n
    ops = torch.ops.fused_wd
    with torch.no_grad():
        ops.adam_(params=ps, grads=[], grads_from_params=True, **lists, **hyper)
        ops.adam_(params=ps, grads=[p.grad for p in ps], **lists, **hyper)
        ops.sgd_(params=ps, grads=[], grads_from_params=True, **sgd)
        assert ops.grads_ready(ps, codes)
        with pytest.raises(RuntimeError, match="exp_avg_sqs has 3 tensors"):
            ops.adam_(params=ps, grads=[], grads_from_params=True, **dict(lists, exp_avg_sqs=lists["exp_avg_sqs"][1:]),
                      **hyper)
    assert [t._use_count() for t in every] == counts
    assert all(float(s) == 2.0 for s in lists["state_steps"])
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match=r"fused_wd::adam_: params\[0\] requires grad and grad mode is on"):
        ops.adam_(params=ps, grads=[], grads_from_params=True, **lists, **hyper)
    with pytest.raises(RuntimeError, match=r"fused_wd::sgd_: params\[0\] requires grad"):
        ops.sgd_(params=ps, grads=[], grads_from_params=True, **sgd)
    assert all(map(torch.equal, ps, before)) and all(float(s) == 2.0 for s in lists["state_steps"])
    assert ops.grads_ready(ps, codes)  # writes nothing: no refusal
    detached = [p.detach() for p in ps]
    ops.adam_(params=detached, grads=[p.grad for p in ps], **lists, **hyper)  # nothing requires grad
    assert all(float(s) == 3.0 for s in lists["state_steps"])


def test_state_pickles_and_checkpoints_as_plain_dicts(tmp_path):
    """The change-counting state dicts (fused_wd/optim.py, _StateMap) never
    reach a checkpoint: torch.load(weights_only=True) reads it, and a
    deep copy or unpickled optimizer steps like the original."""
    import pickle
    a, b, opt_a, opt_b = make_pair()
    for step in range(2):
        step_both(a, b, opt_a, opt_b, step)
    path = tmp_path / "opt.pt"
    torch.save(opt_a.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert type(sd["state"][0]) is dict
    own = opt_a.state_dict()["state"]
    assert all(type(v) is dict for v in own.values())
    assert own[0]["exp_avg"] is opt_a.state[a[0]]["exp_avg"]  # the optimizer's own tensors
    twin = copy.deepcopy(opt_a)
    assert type(twin.state).__name__ == "_StateMap"
    again = pickle.loads(pickle.dumps(opt_a))
    for opt in (twin, again):
        ps = [p for g in opt.param_groups for p in g["params"]]
        for p, q in zip(ps, a):
            p.grad = q.grad.clone()
    give_grads(a, 2)
    for opt in (twin, again):
        ps = [p for g in opt.param_groups for p in g["params"]]
        for p, q in zip(ps, a):
            p.grad = q.grad.clone()
        opt.step()
    opt_a.step()
    for opt in (twin, again):
        for p, q in zip([p for g in opt.param_groups for p in g["params"]], a):
            assert torch.equal(p, q)


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grads", "grads_kept"])
@pytest.mark.parametrize("cls,ref,kw", [
    (fused_wd.AdamW, torch.optim.AdamW, {}),
    (fused_wd.AdamW, torch.optim.AdamW, dict(max_grad_norm=0.05)),
    (fused_wd.SGD, torch.optim.SGD, dict(momentum=0.9)),
], ids=["adamw", "adamw_clip", "sgd_momentum"])
def test_many_params_some_without_grads_through_the_steady_step(cls, ref, kw, fresh):
    # The per-step passes prefetch params, their grads and storages up to
    # three times kMetaAhead (8) entries ahead (csrc/common.h): with 70
    # params, a few without a grad on some steps, every stage of that chain
    # runs over params with and without grads, at the ends of the lists too.
    ps = make_params(torch.float32, "cpu", shapes=[(3,), (2, 2), (5,), ()] * 17 + [(4,), (1,)])
    a, b = clone_leaves(ps), clone_leaves(ps)
    clip = kw.pop("max_grad_norm", None)
    opt_a = cls(a, max_grad_norm=clip, **HYPER, **kw)
    opt_b = ref(b, foreach=False, **HYPER, **kw)
    for step in range(8):
        give_grads(a, step, fresh)
        give_grads(b, step, fresh)
        if step in (2, 3):  # the same params lose their grads for two steps
            for xs in (a, b):
                for k in (1, 40, 69):
                    xs[k].grad = None
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in b if p.grad is not None], clip)
        opt_a.step()
        opt_b.step()
    assert_same(opt_a, opt_b)
    assert steady_steps(opt_a) >= 1


def test_copy_on_write_params_are_copied_before_they_are_written():
    # A param whose storage is a lazy (copy-on-write) clone of another
    # tensor's: the kernels take its data pointer as data_ptr() would, which
    # copies the storage first, so the step writes the param alone and the
    # tensor it was cloned from keeps its values. The grads, only read, may
    # stay shared.
    srcs = [torch.randn(s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate(SHAPES)]
    grad_srcs = [torch.randn(s, generator=torch.Generator().manual_seed(9 + k)) for k, s in enumerate(SHAPES)]
    kept = [t.clone() for t in srcs + grad_srcs]
    a = [torch.nn.Parameter(torch._lazy_clone(t)) for t in srcs]
    b = [torch.nn.Parameter(t.clone()) for t in srcs]
    opt_a, opt_b = fused_wd.AdamW(a, **HYPER), torch.optim.AdamW(b, foreach=False, **HYPER)
    for step in range(3):
        for p, q, g in zip(a, b, grad_srcs):
            p.grad, q.grad = torch._lazy_clone(g), g.clone()
        opt_a.step()
        opt_b.step()
    assert_same(opt_a, opt_b)
    for t, k in zip(srcs + grad_srcs, kept):
        assert torch.equal(t, k)
