"""Awkward and bad input: handled correctly or refused with a clear error."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_wd
from conftest import DEVICES, TOL, adam_hyper, clone_leaves, sgd_hyper


def one_step(make, params, grads):
    opt = make(params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "grad_strides_differ"])
def test_strided_params_match_contiguous(layout, device):
    torch.manual_seed(0)
    base = torch.randn(4, 6, 5, 3, device=device)
    grad = torch.randn(4, 6, 5, 3, device=device)
    if layout == "channels_last":
        p = base.clone().to(memory_format=torch.channels_last)
        g = grad.clone().to(memory_format=torch.channels_last)
    elif layout == "transposed":
        p, g = base.clone().transpose(1, 3), grad.clone().transpose(1, 3)
    elif layout == "sliced":
        big, gbig = torch.randn(8, 6, 5, 3, device=device), torch.randn(8, 6, 5, 3, device=device)
        big[::2] = base
        gbig[::2] = grad
        p, g = big[::2], gbig[::2]
    else:
        p = base.clone()
        g = grad.clone().to(memory_format=torch.channels_last)
    ref = base.clone().requires_grad_(True)
    if layout == "transposed":
        ref = base.clone().transpose(1, 3).contiguous().requires_grad_(True)
    p.requires_grad_(True)
    stride = p.stride()
    untouched = p._base[1::2].clone() if layout == "sliced" else None
    hp = dict(lr=0.1, momentum=0.9, weight_decay=0.1, max_grad_norm=1.0)
    opt = one_step(lambda ps: fused_wd.SGD(ps, **hp), [p], [g])
    opt_ref = one_step(lambda ps: fused_wd.SGD(ps, **hp), [ref], [g.contiguous()])
    torch.testing.assert_close(p.detach().contiguous(), ref.detach(), **TOL[torch.float32])
    assert not torch.equal(p.detach().contiguous(), base.transpose(1, 3).contiguous()
                           if layout == "transposed" else base)  # it moved
    assert p.stride() == stride  # layout untouched
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].contiguous(),
                               opt_ref.state[ref]["momentum_buffer"], **TOL[torch.float32])
    if layout == "sliced":  # the rows in between were not touched
        assert torch.equal(p._base[1::2], untouched)


def test_complex_params_like_torch():
    torch.manual_seed(0)
    z = torch.randn(5, 3, dtype=torch.complex64)
    grads = [torch.randn(5, 3, dtype=torch.complex64) for _ in range(3)]
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    oa = torch.optim.AdamW([a], lr=0.01, foreach=False)
    ob = fused_wd.AdamW([b], lr=0.01, max_grad_norm=1.0)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_([a], 1.0)
        oa.step()
        ob.step()
    torch.testing.assert_close(b, a, **TOL[torch.float32])
    torch.testing.assert_close(ob.state[b]["exp_avg_sq"], oa.state[a]["exp_avg_sq"], **TOL[torch.float32])


def test_zero_dim_and_empty_params():
    ps = [torch.tensor(2.0, requires_grad=True), torch.empty(0, 3, requires_grad=True)]
    opt = one_step(lambda p: fused_wd.AdamW(p, lr=0.1, max_grad_norm=1.0), ps,
                   [torch.tensor(5.0), torch.empty(0, 3)])
    assert opt.state[ps[0]]["step"].item() == 1 and ps[0].item() != 2.0
    assert opt.state[ps[1]]["exp_avg"].shape == (0, 3)


def test_grad_none_everywhere_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fused_wd.AdamW([p], lr=0.1, max_grad_norm=1.0)
    opt.step()
    assert torch.equal(p, torch.ones(3)) and len(opt.state) == 0 and opt.last_grad_norm is None


def test_sparse_grad_refused():
    p = torch.nn.Parameter(torch.ones(4, 2))
    p.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fused_wd.Adam([p]).step()
    with pytest.raises(RuntimeError, match="sparse"):
        fused_wd.clip_grad_norm_([p], 1.0)


def test_grad_dtype_or_shape_mismatch_names_the_param():
    p = torch.nn.Parameter(torch.ones(4, 2))
    opt = fused_wd.AdamW([p])
    if hasattr(p, "grad_dtype"):  # torch >= 2.10 lets a grad's dtype differ when asked
        p.grad_dtype = None
    else:
        pytest.skip("this torch cannot give a param a grad of another dtype")
    p.grad = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"shape \(4, 2\) and dtype torch.float32 has a grad of shape"):
        opt.step()


def _free(t):
    t.untyped_storage().resize_(0)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["plain", "clipped"])
@pytest.mark.parametrize("what,name", [
    ("param", r"params\[1\] \(shape \[10\], storage offset 0\) needs 40 bytes of storage but its "
              r"storage holds 0"),
    ("grad", None),  # named by the norm when the step clips, by the update when not
    ("exp_avg", r"exp_avgs\[1\]"),
    ("step", r"state_steps\[1\] \(shape \[\], storage offset 0\) needs 4 bytes"),
    ("param_view", r"params\[1\] \(shape \[10\], storage offset 10\) needs 80 bytes of storage but "
                   r"its storage holds 48"),
])
@pytest.mark.parametrize("steps_before", [1, 4], ids=["first_steps", "steady_step"])
def test_freed_or_shrunk_storage_is_refused_and_changes_nothing(what, name, clip, steps_before):
    # A tensor whose storage was resized or freed after it was made (FSDP
    # frees its unsharded params' storages so) has no data for the kernels:
    # the step refuses it, naming the list and index, before it writes
    # anything. steps_before=4: the steady step (kept calls) meets it.
    base = torch.arange(30, dtype=torch.float32) / 30
    ps = [torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0))),
          torch.nn.Parameter(base[10:20].clone() if what != "param_view" else base[10:20])]
    opt = fused_wd.AdamW(ps, lr=0.1, max_grad_norm=clip)
    for k in range(steps_before):
        for p in ps:
            p.grad = torch.full_like(p, 0.1 * (k + 1))
        opt.step()
    before = [p.detach().clone() for p in ps]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    target = {"param": ps[1], "grad": ps[1].grad, "exp_avg": opt.state[ps[1]]["exp_avg"],
              "step": opt.state[ps[1]]["step"], "param_view": None}[what]
    if what == "param_view":
        base.untyped_storage().resize_(12 * 4)  # the view needs elements 10..19
    else:
        _free(target)
    if name is None:
        name = r"the grad of tensors\[1\]" if clip else r"grads\[1\]"
    with pytest.raises(RuntimeError, match=name + r".*resized or freed"):
        opt.step()
    assert torch.equal(ps[0], before[0])
    for k, v in opt.state[ps[0]].items():
        assert torch.equal(v, states[0][k]), k


def test_loaded_state_of_wrong_shape_names_the_param():
    p = torch.nn.Parameter(torch.ones(4, 2))
    q = torch.nn.Parameter(torch.ones(3))
    src = fused_wd.AdamW([q])
    q.grad = torch.ones(3)
    src.step()
    opt = fused_wd.AdamW([p])
    opt.load_state_dict(src.state_dict())
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match=r"param group 0: optimizer state 'exp_avg' has shape \(3,\)"):
        opt.step()


def test_param_dtype_changed_after_state_created():
    model = torch.nn.Linear(3, 2)
    opt = fused_wd.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.half()
    opt.zero_grad()
    model(torch.randn(4, 3).half()).sum().backward()
    with pytest.raises(RuntimeError, match="changed after its state was created"):
        opt.step()


def test_same_param_twice():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="appears twice"):
        fused_wd.AdamW([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        fused_wd.AdamW([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("cls,kwargs,match", [
    ("AdamW", dict(lr=-1.0), "Invalid learning rate"),
    ("AdamW", dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    ("AdamW", dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    ("AdamW", dict(eps=-1e-8), "epsilon"),
    ("Adam", dict(weight_decay=-0.1), "weight_decay"),
    ("AdamW", dict(max_grad_norm=0.0), "max_grad_norm"),
    ("AdamW", dict(max_grad_norm=float("inf")), "max_grad_norm"),
    ("AdamW", dict(norm_type=1.0), "norm_type"),
    ("AdamW", dict(weight_decay_mode="elastic"), "weight_decay_mode"),
    ("AdamW", dict(weight_decay_mode="l2", cautious_weight_decay=True), "cautious_weight_decay"),
    ("AdamW", dict(skip_nonfinite="yes"), "skip_nonfinite"),
    ("Adam", dict(decoupled_weight_decay=True, weight_decay_mode="l2"), "contradicts"),
    ("SGD", dict(momentum=-0.5), "momentum"),
    ("SGD", dict(nesterov=True), "Nesterov"),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
])
def test_invalid_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fused_wd, cls)([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_differentiable_refused():
    with pytest.raises(RuntimeError, match="differentiable"):
        fused_wd.AdamW([torch.nn.Parameter(torch.ones(2))], differentiable=True)


def test_groups_with_different_norm_types_refused():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = fused_wd.AdamW([{"params": [a]}, {"params": [b], "norm_type": math.inf}], max_grad_norm=1.0)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="share one norm_type"):
        opt.step()


def test_ops_check_their_arguments():
    ops = torch.ops.fused_wd
    p = [torch.ones(3)]
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        ops.sgd_(p, [torch.ones(4)], [], [], [], [], [], **sgd_hyper())
    with pytest.raises(RuntimeError, match="norm_type must be 2.0 or inf"):
        ops.multi_tensor_norm(p, 1.0)
    with pytest.raises(RuntimeError, match="state_steps"):
        ops.adam_(p, p, [torch.zeros(3)], [torch.zeros(3)], [], [], [], [], **adam_hyper())


# ------------------------------------------------------------ property test

@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))) for _ in range(n)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    cls = draw(st.sampled_from(["Adam", "AdamW", "SGD"]))
    hp = dict(lr=draw(st.sampled_from([0.0, 1e-3, 0.1])),
              weight_decay=draw(st.sampled_from([0.0, 0.01, 1.0])),
              weight_decay_mode=draw(st.sampled_from(["l2", "decoupled", "independent", "corrected", "l1",
                                                      "l1_proximal"])),
              maximize=draw(st.booleans()),
              max_grad_norm=draw(st.sampled_from([None, 0.1, 10.0])),
              norm_type=draw(st.sampled_from([2.0, math.inf])))
    hp["cautious_weight_decay"] = hp["weight_decay_mode"] in ("decoupled", "independent", "corrected") \
        and draw(st.booleans())
    if cls == "SGD":
        hp.update(momentum=draw(st.sampled_from([0.0, 0.9])), dampening=draw(st.sampled_from([0.0, 0.5])))
    else:
        hp.update(amsgrad=draw(st.booleans()), betas=(draw(st.sampled_from([0.0, 0.9])), 0.999),
                  eps=draw(st.sampled_from([1e-8, 1e-30])))
    # a GradScaler's scale (None: no scaler), and a step whose grads overflow
    amp = dict(scale=draw(st.sampled_from([None, 1.0, 0.5, 1e4])),
               overflow_step=draw(st.sampled_from([None, 0, 2])))
    seed = draw(st.integers(0, 2 ** 16))
    return shapes, dtype, cls, hp, amp, seed


@settings(max_examples=int(__import__("os").environ.get("FUSED_WD_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_reference(problem):
    shapes, dtype, cls, hp, amp, seed = problem
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    a, b = clone_leaves(ps), clone_leaves(ps)
    if hp["weight_decay_mode"] in ("independent", "corrected") and hp["lr"] == 0.0:
        with pytest.raises(ValueError, match="initial lr"):
            getattr(fused_wd, cls)(b, **hp)
        return
    oa = getattr(fused_wd.reference, cls)(a, **hp)
    ob = getattr(fused_wd, cls)(b, **hp)
    scalers = [None, None]
    if amp["scale"] is not None:
        scalers = [torch.amp.GradScaler("cpu", init_scale=amp["scale"]) for _ in (a, b)]
        for sc in scalers:
            sc.scale(torch.ones(()))  # (scale() creates the scaler's state)
    for step in range(3):
        scale = 1.0 if amp["scale"] is None else scalers[0].get_scale()
        grads = []
        for x in a:
            gr = torch.randn(x.shape, generator=g, dtype=torch.float64)
            grads.append(None if torch.rand((), generator=g) < 0.2 else (gr * scale).to(dtype))
        if step == amp["overflow_step"] and any(gr is not None and gr.numel() for gr in grads):
            next(gr for gr in grads if gr is not None and gr.numel()).view(-1)[0] = math.inf
        for x, y, gr in zip(a, b, grads):
            x.grad = None if gr is None else gr.clone()
            y.grad = None if gr is None else gr.clone()
        if amp["scale"] is None:
            oa.step()
            ob.step()
        elif any(gr is not None for gr in grads):  # (a GradScaler needs a grad)
            for opt, sc in zip((oa, ob), scalers):
                sc.step(opt)
                sc.update()
    if amp["scale"] is not None:
        assert scalers[0].get_scale() == scalers[1].get_scale()
    if hp["max_grad_norm"] is not None and oa.last_grad_norm is not None:
        torch.testing.assert_close(ob.last_grad_norm, oa.last_grad_norm, rtol=1e-5, atol=0,
                                   equal_nan=True)
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    if dtype == torch.float64:
        # the clip coefficient is a float32 value (from the float32 norm)
        tol = dict(rtol=1e-6, atol=1e-9) if hp["max_grad_norm"] else dict(rtol=1e-9, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, **tol, equal_nan=True)
