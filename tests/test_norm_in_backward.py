"""norm_in_backward=True: the part of the global norm of each param of
_HOOK_READ_MIN elements or more is written by a hook as soon as backward has
finished its grad, the step reads the smaller ones, and it reduces the
parts. The contract: params, every state tensor and last_grad_norm are
bitwise those of norm_in_backward=False on the same loop, whatever happens to
the grads between backward and step; `norm_stats` says which path ran (parts
from backward, parts the step had to compute, parts of the small params)."""
import copy
import math
import pickle

import pytest
import torch

import fused_wd
from conftest import DEVICES

OPTIMIZERS = {
    "adamw": (fused_wd.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam_amsgrad": (fused_wd.Adam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)),
    "sgd_nesterov": (fused_wd.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
}
STEPS = 4


class Net(torch.nn.Module):
    """Three layers and a branch that only odd steps use (its params then
    have no grad on even steps)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 16)
        self.b = torch.nn.Linear(16, 16)
        self.c = torch.nn.Linear(16, 3)
        self.branch = torch.nn.Linear(16, 3)

    def forward(self, x, use_branch=False):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        out = self.c(h)
        return out + self.branch(h) if use_branch else out


def make(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Net().to(device=device, dtype=dtype)


def data(step, device, dtype=torch.float32, micro=0):
    g = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(8, 7, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(8, 3, generator=g).to(device=device, dtype=dtype)
    return x, y


def loss_fn(model, step, device, dtype=torch.float32, micro=0, use_branch=False):
    x, y = data(step, device, dtype, micro)
    return torch.nn.functional.mse_loss(model(x, use_branch), y)


def snapshot(model, opt):
    """Params, every state tensor, last_grad_norm: what must agree bitwise."""
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"state.{names[id(p)]}.{k}"] = v.clone()
    return out


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]) and torch.equal(a[k].isnan(), b[k].isnan()), \
            f"{k} differs: max |diff| {(a[k].double() - b[k].double()).abs().max()}"


def run(loop, device, opt_name="adamw", norm_type=2.0, nib=True, dtype=torch.float32,
        model_fn=None, compile_step=False, **extra):
    """Runs `loop(model, opt, step)` (backward only; the step is taken here,
    by torch.compile(opt.step) when compile_step) for STEPS steps; returns
    the snapshot, the norms and the optimizer."""
    model = make(device, dtype)
    if model_fn is not None:
        model = model_fn(model)
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw, max_grad_norm=0.05, norm_type=norm_type,
              norm_in_backward=nib, **extra)
    step = torch.compile(opt.step, backend="aot_eager") if compile_step else opt.step
    norms = []
    for s in range(STEPS):
        loop(model, opt, s)
        step()
        norms.append(opt.last_grad_norm.clone())
    snap = snapshot(model, opt)
    snap["last_grad_norms"] = torch.stack(norms)
    return snap, opt


def both(loop, device, **kw):
    """The loop with and without the norm in backward: bitwise equal; returns
    the norm_in_backward optimizer's norm_stats."""
    a, opt = run(loop, device, nib=True, **kw)
    b, ref = run(loop, device, nib=False, **kw)
    assert_bitwise(a, b)
    assert ref.norm_stats["from_backward"] == 0
    # every step clipped (the clip factor is part of what must agree)
    assert (a["last_grad_norms"] > 0.05).all()
    return opt.norm_stats


# the hook size the defaults give (fused_wd/_norm_slots.py)
DEFAULT_HOOK_READ_MIN = fused_wd._norm_slots._HOOK_READ_MIN


@pytest.fixture(autouse=True)
def hook_every_param(monkeypatch):
    """Every param gets a hook (by default only params of _HOOK_READ_MIN
    elements or more do, and the step reads the others): the tests' small
    params then meet every hazard of a part read in backward. The tests of
    the default sizes set it back."""
    monkeypatch.setattr(fused_wd._norm_slots, "_HOOK_READ_MIN", 1)


@pytest.fixture
def default_sizes(monkeypatch):
    monkeypatch.setattr(fused_wd._norm_slots, "_HOOK_READ_MIN", DEFAULT_HOOK_READ_MIN)


def plain(model, opt, s):
    opt.zero_grad()
    loss_fn(model, s, next(model.parameters()).device).backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_plain_loop_uses_the_backward_parts_and_matches_bitwise(device, opt_name, norm_type):
    stats = both(plain, device, opt_name=opt_name, norm_type=norm_type)
    # the branch has no grad (its part is 0); every other part came from a hook
    assert stats == {"from_backward": 6 * STEPS, "at_step": 0, "small": 0}


@pytest.fixture
def bulk_proofs(monkeypatch):
    """What each step's bulk proof (every param with a grad the ops may read
    themselves: the parts proven in C loops, NormSlots._all_proven) gave:
    True when it proved every part, False when it handed over to the proof
    one param at a time."""
    seen = []
    real = fused_wd._norm_slots.NormSlots._all_proven

    def spy(self, params, norm_type):
        out = real(self, params, norm_type)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(fused_wd._norm_slots.NormSlots, "_all_proven", spy)
    return seen


def with_branch(model, opt, s):
    """Every param gets a grad (the branch too)."""
    opt.zero_grad()
    loss_fn(model, s, next(model.parameters()).device, use_branch=True).backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["adamw", "sgd_nesterov"])
def test_every_param_with_a_grad_is_proven_in_bulk(device, opt_name, bulk_proofs):
    """Once the step's plan holds (from the second step; SGD's from the third,
    after its momentum buffers exist), the ops read the grads themselves and
    the parts are proven in bulk."""
    stats = both(with_branch, device, opt_name=opt_name)
    assert stats == {"from_backward": 8 * STEPS, "at_step": 0, "small": 0}
    assert len(bulk_proofs) >= STEPS - 2 and all(bulk_proofs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change", ["in place", "a view of the same grad", "replaced"])
def test_a_bulk_proof_that_fails_hands_over_per_param(device, change, bulk_proofs):
    """A grad changed after backward fails the bulk proof, and only its part
    is computed again. A view of the same grad (same storage, same version
    counter) is another object: not proven either."""
    def loop(model, opt, s):
        with_branch(model, opt, s)
        g = model.b.weight.grad
        if change == "in place":
            g.mul_(3.0)
        elif change == "a view of the same grad":
            model.b.weight.grad = g.view_as(g)
        else:
            model.b.weight.grad = g * 3.0

    assert both(loop, device) == {"from_backward": 7 * STEPS, "at_step": STEPS, "small": 0}
    assert bulk_proofs == [False] * (STEPS - 1)


def with_big(device):
    """The test net and a large layer (16 x 140,000 weights, 140,000 biases:
    both over the default hook size) next to it."""
    def build(model):
        model.big = torch.nn.Linear(16, 140_000).to(device)
        return model
    return build


def big_loss(model, s, device, micro=0):
    x, y = data(s, device, micro=micro)
    extra = model.big(torch.tanh(model.a(x))).square().mean() * 1e-3
    return torch.nn.functional.mse_loss(model(x, use_branch=True), y) + extra


@pytest.mark.parametrize("device", DEVICES)
def test_default_sizes_hook_large_params_and_the_step_reads_the_small_ones(device, default_sizes,
                                                                              bulk_proofs):
    """With the default sizes only the large layer's two params have hooks;
    the step reads the eight small ones (one op call, every step proven in
    bulk once the plan holds)."""
    assert 16 * 16 < DEFAULT_HOOK_READ_MIN <= 140_000

    def loop(model, opt, s):
        opt.zero_grad()
        big_loss(model, s, device).backward()

    assert both(loop, device, model_fn=with_big(device)) == \
        {"from_backward": 2 * STEPS, "at_step": 0, "small": 8 * STEPS}
    assert len(bulk_proofs) >= STEPS - 1 and all(bulk_proofs)


@pytest.mark.parametrize("device", DEVICES)
def test_default_sizes_edits_after_backward(device, default_sizes, bulk_proofs):
    """An edit after backward: a large grad's part, read by its hook, is
    computed again; a small grad is read by the step as it is then (no stale
    part, and no fallback needed)."""
    def loop(model, opt, s):
        opt.zero_grad()
        big_loss(model, s, device).backward()
        model.big.weight.grad.mul_(0.5)
        model.b.weight.grad.mul_(3.0)

    assert both(loop, device, model_fn=with_big(device)) == \
        {"from_backward": STEPS, "at_step": STEPS, "small": 8 * STEPS}
    assert len(bulk_proofs) >= STEPS - 1 and not any(bulk_proofs)


@pytest.mark.parametrize("back", [1, 2, 3, 4])
def test_default_sizes_a_small_grad_put_back_is_read_again(default_sizes, bulk_proofs, back):
    """A small param's part is written by the per-param path on some steps
    (here: after a step where a param had no grad) and by the one bulk read
    on others. A grad of an earlier step handed back unchanged must be read
    again, not proven by what that earlier step read: a bulk read may have
    overwritten its slot since."""
    def train(nib):
        model = with_big("cpu")(make("cpu"))
        opt = fused_wd.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1e-3, norm_in_backward=nib)
        kept, norms = {}, []
        for s in range(6):
            if s == 5:  # no backward: an older grad of b.weight comes back
                model.b.weight.grad = kept[back]
            else:
                opt.zero_grad()
                big_loss(model, s, "cpu").backward()
                kept[s] = model.b.weight.grad
            if s in (1, 5):  # the per-param path
                model.branch.weight.grad = None
            opt.step()
            norms.append(opt.last_grad_norm.clone())
        snap = snapshot(model, opt)
        snap["last_grad_norms"] = torch.stack(norms)
        return snap

    a = train(True)
    assert any(bulk_proofs)  # some steps read the small params in bulk
    assert (a["last_grad_norms"] > 1e-3).all()  # every step clipped
    assert_bitwise(a, train(False))


@pytest.mark.parametrize("device", DEVICES)
def test_default_sizes_gradient_accumulation(device, default_sizes):
    def loop(model, opt, s):
        opt.zero_grad()
        for micro in range(3):
            (big_loss(model, s, device, micro) / 3).backward()

    assert both(loop, device, model_fn=with_big(device)) == \
        {"from_backward": 2 * STEPS, "at_step": 0, "small": 8 * STEPS}


@pytest.mark.parametrize("device", DEVICES)
def test_default_sizes_no_param_large_enough(device, default_sizes):
    """No param reaches the hook size: no hook at all, the step reads every
    part, counted as small."""
    stats = both(plain, device)
    assert stats == {"from_backward": 0, "at_step": 0, "small": 6 * STEPS}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_complex_params(device, norm_type):
    """A complex param's part is that of its real view, read by its hook as
    by the step."""
    def build(model):
        g = torch.Generator().manual_seed(5)
        model.z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g).to(device))
        return model

    def loop(model, opt, s):
        opt.zero_grad()
        x, y = data(s, device)
        extra = (model.z.abs() ** 2).sum() * 0.1 * (s + 1)
        (torch.nn.functional.mse_loss(model(x), y) + extra).backward()

    assert both(loop, device, model_fn=build, norm_type=norm_type) == \
        {"from_backward": 7 * STEPS, "at_step": 0, "small": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation(device):
    def loop(model, opt, s):
        opt.zero_grad()
        for micro in range(3):
            (loss_fn(model, s, device, micro=micro) / 3).backward()

    assert both(loop, device) == {"from_backward": 6 * STEPS, "at_step": 0, "small": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_without_set_to_none(device):
    """zero_grad(set_to_none=False) zeroes the grads in place and backward
    adds into them: the hook reads the grad after both."""
    def loop(model, opt, s):
        opt.zero_grad(set_to_none=False)
        loss_fn(model, s, device).backward()

    assert both(loop, device) == {"from_backward": 6 * STEPS, "at_step": 0, "small": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_grads_edited_in_place_after_backward_are_recomputed(device):
    def loop(model, opt, s):
        plain(model, opt, s)
        model.b.weight.grad.mul_(3.0)  # e.g. a user's own gradient surgery

    assert both(loop, device) == {"from_backward": 5 * STEPS, "at_step": STEPS, "small": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_grads_replaced_after_backward_are_recomputed(device):
    def loop(model, opt, s):
        plain(model, opt, s)
        model.a.bias.grad = model.a.bias.grad * 2.0
        model.c.weight.grad = model.c.weight.grad.clone()  # same values, a new tensor

    assert both(loop, device) == {"from_backward": 4 * STEPS, "at_step": 2 * STEPS, "small": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grads_on_some_steps(device):
    def loop(model, opt, s):
        opt.zero_grad()
        loss_fn(model, s, device, use_branch=s % 2 == 1).backward()

    stats = both(loop, device)
    assert stats == {"from_backward": 6 * STEPS + 2 * (STEPS // 2), "at_step": 0, "small": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_a_grad_put_back_after_a_step_without_it_is_not_stale(device):
    """A step where a param has no grad zeroes its part; the grad the hook
    read before, handed back unchanged with no backward since, must not
    reuse the part that step wiped."""
    kept = {}

    def loop(model, opt, s):
        if s == 2:  # no backward: the other grads are step 1's, unchanged
            model.c.bias.grad = kept["g"]
            return
        plain(model, opt, s)
        if s == 1:
            kept["g"] = model.c.bias.grad
            model.c.bias.grad = None

    stats = both(loop, device)
    assert stats == {"from_backward": 6 + 5 + 5 + 6, "at_step": 1, "small": 0}


def test_grad_scaler_with_and_without_unscale():
    device = "cpu"

    def loop_with(unscale):
        def loop(model, opt, s):
            scaler = opt.scaler
            opt.zero_grad()
            scaler.scale(loss_fn(model, s, device)).backward()
            if unscale:
                scaler.unscale_(opt)
        return loop

    # scaler.unscale_ rewrites the grads without advancing their version
    # counters; fused_wd watches it (fused_wd/_norm_slots.py)
    for unscale, expect in ((False, {"from_backward": 6 * STEPS, "at_step": 0, "small": 0}),
                            (True, {"from_backward": 0, "at_step": 6 * STEPS, "small": 0})):
        results = []
        for nib in (True, False):
            model = make(device)
            opt = fused_wd.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05,
                                 norm_in_backward=nib)
            opt.scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
            for s in range(STEPS):
                loop_with(unscale)(model, opt, s)
                opt.scaler.step(opt)
                opt.scaler.update()
            snap = snapshot(model, opt)
            snap["norm"] = opt.last_grad_norm.clone()
            results.append((snap, opt.norm_stats))
        assert_bitwise(results[0][0], results[1][0])
        assert results[0][1] == expect, unscale


def test_unscale_then_a_plain_step():
    """scaler.unscale_(opt) followed by opt.step() itself (no scaler.step):
    the grads were unscaled in place, the parts must be read again."""
    results = []
    for nib in (True, False):
        model = make("cpu")
        opt = fused_wd.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05,
                             norm_in_backward=nib)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for s in range(STEPS):
            opt.zero_grad()
            scaler.scale(loss_fn(model, s, "cpu")).backward()
            scaler.unscale_(opt)
            opt.step()
            scaler.update()
        results.append((snapshot(model, opt), opt.last_grad_norm.clone(), opt.norm_stats))
    assert_bitwise(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2] == {"from_backward": 0, "at_step": 6 * STEPS, "small": 0}


def test_compiled_model():
    """A torch.compile'd model: its backward is an AOT autograd graph, and the
    params' AccumulateGrad still runs the hooks (aot_eager: the same graphs
    without generating code)."""
    stats = both(plain, "cpu", model_fn=lambda m: torch.compile(m, backend="aot_eager"))
    assert stats == {"from_backward": 6 * STEPS, "at_step": 0, "small": 0}


def test_compiled_step():
    """opt.step under torch.compile (aot_eager): the proofs run in Python on
    every call, so a grad edited after backward on odd steps is still
    caught."""
    def loop(model, opt, s):
        plain(model, opt, s)
        if s % 2:
            model.b.weight.grad.mul_(3.0)

    a, opt = run(loop, "cpu", nib=True, compile_step=True)
    b, _ = run(loop, "cpu", nib=False)
    assert_bitwise(a, b)
    assert opt.norm_stats == {"from_backward": 6 * STEPS - STEPS // 2, "at_step": STEPS // 2, "small": 0}


def test_remove_norm_hooks():
    model = make("cpu")
    opt = fused_wd.AdamW(model.parameters(), max_grad_norm=0.05, norm_in_backward=True)
    assert opt.norm_in_backward
    plain(model, opt, 0)
    opt.step()
    assert opt.norm_stats == {"from_backward": 6, "at_step": 0, "small": 0}
    opt.remove_norm_hooks()
    assert not opt.norm_in_backward
    plain(model, opt, 1)
    opt.step()
    assert opt.norm_stats == {"from_backward": 6, "at_step": 6, "small": 0}


def test_add_param_group_hooks_the_new_params():
    model = make("cpu")
    opt = fused_wd.AdamW([p for n, p in model.named_parameters() if not n.startswith("c.")],
                         max_grad_norm=0.05, norm_in_backward=True)
    opt.add_param_group({"params": list(model.c.parameters()), "lr": 1e-4})
    plain(model, opt, 0)
    opt.step()
    assert opt.norm_stats == {"from_backward": 6, "at_step": 0, "small": 0}


def test_no_clipping_group_no_work_in_backward():
    model = make("cpu")
    opt = fused_wd.AdamW(model.parameters(), norm_in_backward=True)
    plain(model, opt, 0)
    opt.step()
    assert opt.last_grad_norm is None
    assert opt.norm_stats == {"from_backward": 0, "at_step": 0, "small": 0}


def test_state_dict_and_pickling_are_unaffected():
    model = make("cpu")
    opt = fused_wd.AdamW(model.parameters(), max_grad_norm=0.05, norm_in_backward=True)
    ref = fused_wd.AdamW(make("cpu").parameters(), max_grad_norm=0.05)
    plain(model, opt, 0)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()
    ref.load_state_dict(sd)
    for o in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert not o.norm_in_backward
        assert o.state_dict()["param_groups"] == sd["param_groups"]


def test_bad_flag_is_refused():
    with pytest.raises(TypeError, match="norm_in_backward must be True or False"):
        fused_wd.AdamW(make("cpu").parameters(), norm_in_backward="yes")


# ------------------------------------------------------------ the two ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_parts_one_by_one_equal_one_call(device, norm_type):
    """What the hooks rely on: a tensor's part is the same bits whichever call
    writes it, and the norm of the parts is multi_tensor_norm's."""
    g = torch.Generator().manual_seed(0)
    shapes = [(300_000,), (37, 19), (0,), (5,), (70_000,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64]
    ts = [torch.randn(s, generator=g).to(dt).to(device) for s, dt in zip(shapes, dtypes)]
    whole = torch.full((len(ts),), math.nan, dtype=torch.float64, device=device)
    fused_wd._ops.norm_partials_(ts, whole, list(range(len(ts))), norm_type)
    single = torch.full((len(ts),), math.nan, dtype=torch.float64, device=device)
    for i in reversed(range(len(ts))):
        fused_wd._ops.norm_partials_([ts[i]], single, [i], norm_type)
    assert torch.equal(whole, single)
    want = [t.double().abs().max() if norm_type == math.inf else t.double().square().sum()
            for t in ts if t.numel()]
    # short runs of float32 squares are summed in float32 before float64
    torch.testing.assert_close(whole[[0, 1, 3, 4]], torch.stack(want), rtol=1e-6, atol=0)
    assert whole[2] == 0
    norm = fused_wd._ops.norm_from_partials(whole, norm_type)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert torch.equal(norm, fused_wd._ops.multi_tensor_norm(ts, norm_type))


def test_none_entries_write_zero_and_the_rest_is_kept():
    out = torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)
    fused_wd._ops.norm_partials_([None, torch.ones(4)], out, [2, 0], 2.0)
    assert out.tolist() == [4.0, 6.0, 0.0]


@pytest.mark.parametrize("call,words", [
    (lambda: fused_wd._ops.norm_partials_([torch.ones(2)], torch.zeros(2, dtype=torch.float64),
                                          [2], 2.0), "index[0] = 2 is outside out (2 slots)"),
    (lambda: fused_wd._ops.norm_partials_([torch.ones(2), torch.ones(1)],
                                          torch.zeros(2, dtype=torch.float64), [1, 1], 2.0),
     "names a slot twice"),
    (lambda: fused_wd._ops.norm_partials_([torch.ones(2)], torch.zeros(2), [0], 2.0),
     "contiguous 1-D float64"),
    (lambda: fused_wd._ops.norm_partials_([torch.ones(2)], torch.zeros(2, dtype=torch.float64),
                                          [0, 1], 2.0), "index has 2 entries for 1 tensors"),
    (lambda: fused_wd._ops.norm_partials_([torch.ones(2)], torch.zeros(2, dtype=torch.float64),
                                          [0], 1.0), "norm_type must be 2.0 or inf"),
    (lambda: fused_wd._ops.norm_partials_([torch.ones(2, dtype=torch.int32)],
                                          torch.zeros(2, dtype=torch.float64), [0], 2.0), "Int"),
    (lambda: fused_wd._ops.norm_from_partials(torch.zeros(2, 2, dtype=torch.float64), 2.0),
     "contiguous 1-D float64"),
])
def test_bad_arguments_are_refused(call, words):
    with pytest.raises(RuntimeError, match=words.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        call()
