"""The CUDA backend's own source, run on the host: csrc/cuda compiled by g++
with the emulator of csrc/emu (256-thread blocks, a real __syncthreads
barrier, blocks in shuffled order) as the fused_wd_emu operators, and
compared with the CPU kernels on the same inputs.

Both sides run the element math of csrc/fused_wd/math.h, compiled with FMA
contraction off and IEEE division and sqrt, so every update (all dtypes,
every mixed layout) must match bit for bit given the same global norm. The
norm itself is summed in another order than the CPU's (per-chunk float64
partials of per-thread float sums, combined per tensor, then over the
tensors), so it is compared with a float64 reference instead.

Every tensor sits in a buffer of its own at an element offset (0 keeps the
vector path, other offsets misalign it), between poisoned guard elements,
and the whole buffers are compared: a write outside a tensor, or a missed
write, shows up. The inputs are random, and the tests check that the
update changes nearly every element, so that a skipped write cannot pass
unnoticed.
"""
import itertools
import math

import pytest
import torch

import emu_build
import fused_wd  # noqa: F401  (registers torch.ops.fused_wd)
from conftest import adam_hyper, sgd_hyper

pytestmark = pytest.mark.cuda_emulated

CPU = torch.ops.fused_wd
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# a 0-dim param, an empty one, tails of the 4- and 8-wide vector paths, a
# chunk boundary (16384 elements per chunk) and a tensor of three chunks
SHAPES = [(37, 19), (5,), (), (0,), (3, 4, 5), (16385,), (40001,), (7,)]
OFFSETS = [0, 1, 0, 3, 2, 0, 1, 5]
GUARD = 3


@pytest.fixture(scope="module")
def emu():
    return emu_build.load()


def bits(t):
    """The raw bits of t, to compare NaN payloads and signed zeros too."""
    t = t.contiguous().view(-1)
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = (bits(actual) != bits(expected)).nonzero()
    assert diff.numel() == 0, (
        f"{what}: {diff.numel()} of {actual.numel()} elements differ, first at {diff[0].item()}: "
        f"{actual.reshape(-1)[diff[0]].item()} vs {expected.reshape(-1)[diff[0]].item()}")


class Placed:
    """Values to place, each in a fresh buffer at an element offset with
    poisoned guard elements around it."""

    def __init__(self, values, offset):
        self.values, self.offset = values, offset

    def make(self):
        n = self.values.numel()
        buf = torch.full((self.offset + n + GUARD,), float("nan"), dtype=self.values.dtype)
        view = buf[self.offset:self.offset + n].view(self.values.shape)
        view.copy_(self.values)
        return view


def make_lists(spec):
    """{name: [Placed]} -> {name: [tensor]} (fresh buffers)."""
    return {k: [p.make() for p in v] if isinstance(v, list) else v for k, v in spec.items()}


def whole(t):
    """The buffer a placed tensor lives in (guards included)."""
    return t._base if t._base is not None else t


def compare(spec, run_cpu, run_emu, lists, what):
    a, b = make_lists(spec), make_lists(spec)
    run_cpu(a)
    run_emu(b)
    for name in lists:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert_bitwise(whole(y), whole(x), f"{what}: {name}[{i}]")
    return a


def rand(shape, dtype, gen, kind="normal", scale=1.0):
    if kind == "positive":
        x = torch.rand(shape, generator=gen, dtype=torch.float64) * scale + 1e-4 * scale
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype)


def placed_list(shapes, dtype, gen, **kw):
    return [Placed(rand(s, dtype, gen, **kw), OFFSETS[i % len(OFFSETS)]) for i, s in enumerate(shapes)]


def for_dtype(options, dtype):
    """options with the lr (plain or tensor) 10x larger for 16-bit params:
    large enough that the update changes nearly every stored element."""
    if dtype not in (torch.float16, torch.bfloat16):
        return options
    out = dict(options)
    out["lr"] = 10 * out.get("lr", 0.05)
    if out.get("lr_tensor") is not None:
        out["lr_tensor"] = 10 * out["lr_tensor"]
    return out


def changed_fraction(before, after):
    n = sum(t.numel() for t in before)
    same = sum(int((bits(a) == bits(b)).sum()) for a, b in zip(before, after))
    return 1 - same / max(n, 1)


# ------------------------------------------------------------------ norm


def norm64(tensors, norm_type):
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    return torch.linalg.vector_norm(flat, ord=norm_type).float()


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_norm_matches_float64(emu, dtype, norm_type):
    gen = torch.Generator().manual_seed(1)
    dts = itertools.cycle(DTYPES) if dtype == "mixed" else itertools.repeat(dtype)
    ts = [Placed(rand(s, next(dts), gen, scale=3.0), OFFSETS[i % 8]).make()
          for i, s in enumerate(SHAPES)]
    got = emu.multi_tensor_norm(ts, norm_type)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = norm64(ts, norm_type)
    if norm_type == math.inf:
        assert_bitwise(got, want, "inf norm")
    else:
        # per-thread float sums of at most 64 squares, then float64
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    torch.testing.assert_close(got, CPU.multi_tensor_norm(ts, norm_type), rtol=2e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_many_tensors_and_chunks(emu, norm_type):
    """More tensors than one table holds (several launches), some of several
    chunks, written to consecutive slots of one partials buffer."""
    gen = torch.Generator().manual_seed(2)
    # a table holds 93 tensors of one list
    shapes = [(int(n),) for n in torch.randint(0, 40, (115,), generator=gen)] + [(50000,), (16384,)]
    ts = [Placed(rand(s, torch.float32, gen), i % 4).make() for i, s in enumerate(shapes)]
    got = emu.multi_tensor_norm(ts, norm_type)
    want = norm64(ts, norm_type)
    torch.testing.assert_close(got, want, rtol=2e-6 if norm_type == 2.0 else 0, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("special", ["nan", "inf", "both"])
def test_norm_propagates_nonfinite(emu, norm_type, special):
    gen = torch.Generator().manual_seed(3)
    ts = [rand(s, torch.float32, gen) for s in [(100,), (40000,), (7,)]]
    if special in ("nan", "both"):
        ts[1][33333] = float("nan")
    if special in ("inf", "both"):
        ts[2][3] = -float("inf")
    got = emu.multi_tensor_norm(ts, norm_type)
    want = norm64(ts, norm_type)
    assert (got.isnan() and want.isnan()) or (got == want), (got, want)
    assert got.isnan() == (special != "inf")


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_partials_do_not_depend_on_the_call(emu, norm_type):
    """What norm_in_backward relies on, on the CUDA code: a tensor's partial
    is the same bits whether it is written alone, in a batch of other dtypes
    or in a call of more tensors than one table holds; None and empty
    tensors write 0; the norm of the partials is multi_tensor_norm's."""
    gen = torch.Generator().manual_seed(4)
    sizes = [int(n) for n in torch.randint(0, 40, (120,), generator=gen)] + [50000, 16384, 0]
    dts = itertools.cycle(DTYPES)
    ts = [Placed(rand((n,), next(dts), gen), i % 4).make() for i, n in enumerate(sizes)]
    n = len(ts)
    whole = torch.full((n,), math.nan, dtype=torch.float64)
    emu.norm_partials_(ts, whole, list(range(n)), norm_type)
    # one by one (each call a launch; the emulator runs launches slowly): the
    # chunked tensors, the empty one and a spread of small ones of each dtype
    alone = sorted({0, 1, 2, 3, 4, 5, 6, 7, n - 3, n - 2, n - 1, *range(9, n - 3, 11)}, reverse=True)
    single = torch.full((n,), math.nan, dtype=torch.float64)
    for i in alone:
        emu.norm_partials_([ts[i]], single, [i], norm_type)
    assert_bitwise(single[alone], whole[alone], "partials one by one")
    halves = torch.full((n,), math.nan, dtype=torch.float64)
    emu.norm_partials_(ts[1::2] + [None], halves, list(range(1, n, 2)) + [0], norm_type)
    emu.norm_partials_(ts[2::2], halves, list(range(2, n, 2)), norm_type)
    emu.norm_partials_(ts[:1], halves, [0], norm_type)
    assert_bitwise(halves, whole, "partials in two interleaved calls")
    def part(t):
        if not t.numel():
            return torch.zeros((), dtype=torch.float64)
        return t.double().abs().max() if norm_type == math.inf else t.double().square().sum()

    want = [part(t) for t in ts]
    # per-thread opmath sums of at most 64 elements, then float64
    torch.testing.assert_close(whole, torch.stack(want), rtol=1e-6, atol=0)
    cpu = torch.full((n,), math.nan, dtype=torch.float64)
    CPU.norm_partials_(ts, cpu, list(range(n)), norm_type)
    torch.testing.assert_close(whole, cpu, rtol=1e-6, atol=0)
    norm = emu.norm_from_partials(whole, norm_type)
    assert_bitwise(norm, emu.multi_tensor_norm(ts, norm_type), "norm of the partials")
    torch.testing.assert_close(norm, norm64(ts, norm_type), rtol=2e-6, atol=0)


def test_norm_from_partials_of_nothing_is_zero(emu):
    assert emu.norm_from_partials(torch.zeros(0, dtype=torch.float64), 2.0).item() == 0.0
    out = torch.full((3,), math.nan, dtype=torch.float64)
    emu.norm_partials_([None, torch.zeros(0)], out, [2, 0], 2.0)
    assert out[0] == 0 and out[2] == 0 and out[1].isnan()


def test_norm_refuses_empty_list(emu):
    with pytest.raises(RuntimeError, match="empty list"):
        emu.multi_tensor_norm([], 2.0)


# ------------------------------------------------------------------ clip


@pytest.mark.parametrize("max_norm", [0.5, 1e9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_matches_cpu(emu, dtype, max_norm):
    gen = torch.Generator().manual_seed(4)
    spec = {"tensors": placed_list(SHAPES, dtype, gen)}
    total = torch.tensor(37.5)
    out = compare(spec, lambda a: CPU.clip_(a["tensors"], total, max_norm),
                  lambda b: emu.clip_(b["tensors"], total, max_norm), ["tensors"], "clip_")
    if max_norm < 1:
        assert changed_fraction([p.values for p in spec["tensors"]], out["tensors"]) > 0.95


def test_clip_by_nan_norm_gives_nan(emu):
    ts = [torch.randn(100), torch.randn(20000)]
    emu.clip_(ts, torch.tensor(float("nan")), 1.0)
    assert all(t.isnan().all() for t in ts)


# ------------------------------------------------------------------ adam

ADAM_LISTS = ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params"]


def adam_spec(dtype, gen, shapes=SHAPES, state_dtype=None, master=False, amsgrad=False, step=4.0):
    sd = state_dtype or dtype
    params = placed_list(shapes, dtype, gen)
    return dict(
        params=params,
        grads=placed_list(shapes, dtype, gen),
        exp_avgs=placed_list(shapes, sd, gen, scale=0.3),
        exp_avg_sqs=placed_list(shapes, sd, gen, kind="positive", scale=0.5),
        max_exp_avg_sqs=placed_list(shapes, sd, gen, kind="positive", scale=0.6) if amsgrad else [],
        state_steps=[Placed(torch.tensor(step + i), 0) for i in range(len(shapes))],
        master_params=[Placed(p.values.float() + 1e-3 * rand(p.values.shape, torch.float32, gen), p.offset)
                       for p in params] if master else [],
    )


def adam_kwargs(betas=(0.9, 0.999), lr=0.05, **kw):
    return adam_hyper(beta1=betas[0], beta2=betas[1], lr=lr, **kw)


def adam_call(ops, lists, kw, sr_ids=()):
    ops.adam_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
              lists["max_exp_avg_sqs"], lists["state_steps"], master_params=lists["master_params"],
              sr_ids=list(sr_ids), **kw)


ADAM_OPTIONS = {
    "plain": {},
    "l2": dict(weight_decay=0.1, decay_mode=0),
    "decoupled": dict(weight_decay=0.1, decay_mode=1),
    "independent": dict(weight_decay=0.1, decay_mode=2, initial_lr=0.2),
    "corrected": dict(weight_decay=0.1, decay_mode=3, initial_lr=0.2),
    "cautious": dict(weight_decay=0.1, decay_mode=1, cautious_wd=True),
    "cautious_independent_amsgrad": dict(weight_decay=0.1, decay_mode=2, initial_lr=0.2, cautious_wd=True,
                                         amsgrad=True),
    "cautious_corrected_maximize_clip": dict(weight_decay=0.3, decay_mode=3, initial_lr=0.1, cautious_wd=True,
                                             maximize=True, grad_norm=torch.tensor(7.25), max_norm=1.0),
    "l1": dict(weight_decay=0.1, decay_mode=4),
    "l1_amsgrad_maximize_clip": dict(weight_decay=0.3, decay_mode=4, amsgrad=True, maximize=True,
                                     grad_norm=torch.tensor(7.25), max_norm=1.0),
    # a threshold lr * wd = 0.1 that zeroes some elements
    "l1_proximal": dict(weight_decay=2.0, decay_mode=5),
    "l1_proximal_amsgrad_maximize_lr_tensor": dict(weight_decay=2.0, decay_mode=5, amsgrad=True, maximize=True,
                                                   lr_tensor=torch.tensor(0.03, dtype=torch.float64)),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True, weight_decay=0.1, decay_mode=0),
    "clip": dict(grad_norm=torch.tensor(7.25), max_norm=1.0),
    "clip_inactive": dict(grad_norm=torch.tensor(0.5), max_norm=1.0),
    "scaled": dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0)),
    "lr_tensor": dict(lr_tensor=torch.tensor(0.03, dtype=torch.float64)),
    "everything": dict(amsgrad=True, maximize=True, weight_decay=0.05, decay_mode=1,
                       grad_norm=torch.tensor(3.0), max_norm=0.5, grad_scale=torch.tensor(64.0),
                       found_inf=torch.tensor(0.0), lr_tensor=torch.tensor(0.06)),
}


@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_cpu(emu, dtype, option):
    gen = torch.Generator().manual_seed(5)
    kw = adam_kwargs(**for_dtype(ADAM_OPTIONS[option], dtype))
    spec = adam_spec(dtype, gen, amsgrad=kw["amsgrad"])
    out = compare(spec, lambda a: adam_call(CPU, a, kw), lambda b: adam_call(emu, b, kw),
                  ADAM_LISTS, f"adam {option}")
    assert changed_fraction([p.values for p in spec["params"]], out["params"]) > 0.9
    assert [float(s) for s in out["state_steps"]] == [5.0 + i for i in range(len(SHAPES))]


def test_adam_several_steps_match_cpu(emu):
    """Steps in a row on the same tensors: the counters advance on the device
    and the next step's bias correction reads them."""
    gen = torch.Generator().manual_seed(6)
    spec = adam_spec(torch.float32, gen, step=0.0, amsgrad=True)
    a, b = make_lists(spec), make_lists(spec)
    kw = adam_kwargs(amsgrad=True, weight_decay=0.1, decay_mode=1)
    for step in range(3):
        grads = [rand(p.shape, p.dtype, gen) for p in a["params"]]
        a["grads"], b["grads"] = grads, [g.clone() for g in grads]
        adam_call(CPU, a, kw)
        adam_call(emu, b, kw)
    for name in ADAM_LISTS:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert_bitwise(y, x, f"{name}[{i}]")
    assert [float(s) for s in b["state_steps"]] == [3.0 + i for i in range(len(SHAPES))]


# Every (param, state) storage pair with and without a master and stochastic
# rounding: each backend must run exactly the layouts of the one rule
# (csrc/fused_wd/layout.h) and refuse the others.
LOW = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [(p, s, m, sr) for p in LOW for s in LOW for m in (False, True) for sr in (False, True)
           if not (p == s and not m and not sr)]


def same_layout_verdict(spec, call, emu, names, what):
    """Both backends accept the layout and agree bit for bit, or both refuse
    it with the same message."""
    out, errs = [], []
    for ops in (CPU, emu):
        lists = make_lists(spec)
        try:
            call(ops, lists)
            errs.append(None)
        except RuntimeError as e:
            errs.append(e)
        out.append(lists)
    assert (errs[0] is None) == (errs[1] is None), errs
    if errs[0] is not None:  # refused for the same reason (the op's name differs)
        assert str(errs[0]).split(": ", 1)[1] == str(errs[1]).split(": ", 1)[1], errs
        return
    for name in names:
        for i, (x, y) in enumerate(zip(out[0][name], out[1][name])):
            assert_bitwise(whole(y), whole(x), f"{what}: {name}[{i}]")
    assert changed_fraction([p.values for p in spec["params"]], out[0]["params"]) > 0.9


def layout_id(layout):
    p, s, m, sr = layout
    name = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    return f"{name[p]}-{name[s]}" + ("-master" if m else "") + ("-sr" if sr else "")


# decay variants of the mixed-layout tests: plain decoupled, with amsgrad,
# and cautious corrected decay (its own kernel instantiation)
MIXED_ADAM = {"decoupled": dict(decay_mode=1), "amsgrad": dict(decay_mode=1, amsgrad=True),
              "cautious_corrected": dict(decay_mode=3, initial_lr=0.2, cautious_wd=True),
              "l1": dict(decay_mode=4), "l1_proximal": dict(decay_mode=5, weight_decay=2.0)}


@pytest.mark.parametrize("variant", list(MIXED_ADAM))
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_adam_mixed_layouts_match_cpu(emu, layout, variant):
    pdt, sdt, master, sr = layout
    amsgrad = MIXED_ADAM[variant].get("amsgrad", False)
    gen = torch.Generator().manual_seed(7)
    spec = adam_spec(pdt, gen, state_dtype=sdt, master=master, amsgrad=amsgrad)
    kw = adam_kwargs(**for_dtype(dict(dict(weight_decay=0.1), **MIXED_ADAM[variant], grad_norm=torch.tensor(9.0),
                     max_norm=1.0, stochastic_rounding=sr, sr_seed=12345), pdt))
    ids = [3 * i + 1 for i in range(len(SHAPES))]
    same_layout_verdict(spec, lambda ops, lists: adam_call(ops, lists, kw, ids), emu, ADAM_LISTS,
                        layout_id(layout))


def test_adam_many_tensors_match_cpu(emu):
    """More tensors than one table holds, for the plain and the mixed
    kernel, and more step counters than one counter launch holds."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(int(n),) for n in torch.randint(1, 200, (400,), generator=gen)]
    for pdt, sdt, master in [(torch.float32, None, False), (torch.bfloat16, torch.float32, True)]:
        spec = adam_spec(pdt, gen, shapes=shapes, state_dtype=sdt, master=master)
        kw = adam_kwargs(weight_decay=0.1, decay_mode=1)
        out = compare(spec, lambda a: adam_call(CPU, a, kw), lambda b: adam_call(emu, b, kw),
                      ADAM_LISTS, f"adam x400 {pdt}")
        assert [float(s) for s in out["state_steps"]] == [5.0 + i for i in range(400)]


@pytest.mark.parametrize("why", ["found_inf", "nonfinite_norm"])
@pytest.mark.parametrize("mixed", [False, True])
def test_adam_skipped_step_writes_nothing(emu, why, mixed):
    gen = torch.Generator().manual_seed(9)
    spec = adam_spec(torch.bfloat16 if mixed else torch.float32, gen,
                     state_dtype=torch.float32 if mixed else None, master=mixed)
    kw = adam_kwargs(weight_decay=0.1, decay_mode=1, **(
        dict(found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0)) if why == "found_inf"
        else dict(grad_norm=torch.tensor(float("inf")), max_norm=1.0)))
    b = make_lists(spec)
    adam_call(emu, b, kw)
    for name in ADAM_LISTS:
        for i, p in enumerate(spec[name]):
            assert_bitwise(b[name][i], p.values, f"{name}[{i}]")


def test_adam_nonfinite_norm_without_skip_matches_cpu(emu):
    gen = torch.Generator().manual_seed(10)
    spec = adam_spec(torch.float32, gen)
    kw = adam_kwargs(grad_norm=torch.tensor(float("nan")), max_norm=1.0, skip_nonfinite=False)
    out = compare(spec, lambda a: adam_call(CPU, a, kw), lambda b: adam_call(emu, b, kw),
                  ADAM_LISTS, "adam nan norm")
    assert all(p.isnan().all() for p in out["params"] if p.numel())


# ------------------------------------------------------------------ sgd

SGD_LISTS = ["params", "momentum_buffers", "master_params", "state_steps"]


def sgd_spec(dtype, gen, shapes=SHAPES, state_dtype=None, master=False, momentum=True, sr=False):
    params = placed_list(shapes, dtype, gen)
    return dict(
        params=params,
        grads=placed_list(shapes, dtype, gen),
        momentum_buffers=placed_list(shapes, state_dtype or dtype, gen, scale=0.5) if momentum else [],
        master_params=[Placed(p.values.float() + 1e-3 * rand(p.values.shape, torch.float32, gen), p.offset)
                       for p in params] if master else [],
        state_steps=[Placed(torch.tensor(2.0 + i), 0) for i in range(len(shapes))] if sr else [],
    )


def sgd_kwargs(lr=0.05, **kw):
    return sgd_hyper(lr=lr, **kw)


def sgd_call(ops, lists, kw, is_new, sr_ids=()):
    ops.sgd_(lists["params"], lists["grads"], lists["momentum_buffers"], is_new,
             master_params=lists["master_params"], state_steps=lists["state_steps"],
             sr_ids=list(sr_ids), **kw)


SGD_OPTIONS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "l2": dict(momentum=0.9, weight_decay=0.1, decay_mode=0),
    "decoupled": dict(momentum=0.9, weight_decay=0.1, decay_mode=1),
    "independent": dict(weight_decay=0.1, decay_mode=2, initial_lr=0.5),
    "corrected": dict(momentum=0.9, weight_decay=0.1, decay_mode=3, initial_lr=0.5),
    "cautious": dict(momentum=0.9, weight_decay=0.1, decay_mode=1, cautious_wd=True),
    "cautious_plain_corrected": dict(weight_decay=0.3, decay_mode=3, initial_lr=0.1, cautious_wd=True),
    "cautious_nesterov_independent_maximize": dict(momentum=0.9, nesterov=True, weight_decay=0.1,
                                                   decay_mode=2, initial_lr=0.5, cautious_wd=True,
                                                   maximize=True),
    "l1": dict(momentum=0.9, weight_decay=0.1, decay_mode=4),
    "l1_plain_maximize_clip": dict(weight_decay=0.3, decay_mode=4, maximize=True,
                                   grad_norm=torch.tensor(7.25), max_norm=1.0),
    # thresholds lr * wd = 0.1 that zero some elements
    "l1_proximal_nesterov": dict(momentum=0.9, nesterov=True, weight_decay=2.0, decay_mode=5),
    "l1_proximal_plain_maximize_lr_tensor": dict(weight_decay=2.0, decay_mode=5, maximize=True,
                                                 lr_tensor=torch.tensor(0.03)),
    "maximize": dict(momentum=0.5, maximize=True),
    "clip": dict(momentum=0.9, grad_norm=torch.tensor(7.25), max_norm=1.0),
    "scaled": dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0)),
    "lr_tensor": dict(momentum=0.9, lr_tensor=torch.tensor(0.03)),
}


@pytest.mark.parametrize("first", [False, True], ids=["buffer", "new_buffer"])
@pytest.mark.parametrize("option", list(SGD_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_matches_cpu(emu, dtype, option, first):
    kw = sgd_kwargs(**for_dtype(SGD_OPTIONS[option], dtype))
    mom = kw["momentum"] != 0
    if first and not mom:
        pytest.skip("no momentum buffer")
    gen = torch.Generator().manual_seed(11)
    spec = sgd_spec(dtype, gen, momentum=mom)
    # some buffers new, some not, in one call
    is_new = [first and i % 2 == 0 for i in range(len(SHAPES))] if mom else []
    out = compare(spec, lambda a: sgd_call(CPU, a, kw, is_new), lambda b: sgd_call(emu, b, kw, is_new),
                  SGD_LISTS, f"sgd {option}")
    assert changed_fraction([p.values for p in spec["params"]], out["params"]) > 0.9


MIXED_SGD = {"plain-l2": dict(momentum=0.0, decay_mode=0), "momentum-l2": dict(momentum=0.9, decay_mode=0),
             "momentum-cautious": dict(momentum=0.9, decay_mode=1, cautious_wd=True),
             "momentum-l1": dict(momentum=0.9, decay_mode=4),
             "plain-l1_proximal": dict(momentum=0.0, decay_mode=5, weight_decay=2.0)}


@pytest.mark.parametrize("variant", list(MIXED_SGD))
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_sgd_mixed_layouts_match_cpu(emu, layout, variant):
    pdt, sdt, master, sr = layout
    momentum = MIXED_SGD[variant]["momentum"]
    gen = torch.Generator().manual_seed(12)
    spec = sgd_spec(pdt, gen, state_dtype=sdt, master=master, momentum=momentum != 0, sr=sr)
    kw = sgd_kwargs(**for_dtype(dict(dict(weight_decay=0.1), **MIXED_SGD[variant],
                                     grad_norm=torch.tensor(9.0), max_norm=1.0,
                                     stochastic_rounding=sr, sr_seed=999), pdt))
    is_new = [i % 3 == 0 for i in range(len(SHAPES))] if momentum else []
    ids = [5 * i for i in range(len(SHAPES))]
    same_layout_verdict(spec, lambda ops, lists: sgd_call(ops, lists, kw, is_new, ids), emu, SGD_LISTS,
                        layout_id(layout))


def test_sgd_many_tensors_match_cpu(emu):
    gen = torch.Generator().manual_seed(13)
    shapes = [(int(n),) for n in torch.randint(1, 200, (150,), generator=gen)]
    spec = sgd_spec(torch.float32, gen, shapes=shapes)
    kw = sgd_kwargs(momentum=0.9, weight_decay=0.1, decay_mode=1)
    is_new = [i % 2 == 0 for i in range(len(shapes))]
    compare(spec, lambda a: sgd_call(CPU, a, kw, is_new), lambda b: sgd_call(emu, b, kw, is_new),
            SGD_LISTS, "sgd x150")


def test_sgd_skipped_step_writes_nothing(emu):
    gen = torch.Generator().manual_seed(14)
    spec = sgd_spec(torch.bfloat16, gen, sr=True)
    kw = sgd_kwargs(momentum=0.9, found_inf=torch.tensor(1.0), stochastic_rounding=True)
    b = make_lists(spec)
    sgd_call(emu, b, kw, [False] * len(SHAPES), range(len(SHAPES)))
    for name in SGD_LISTS:
        for i, p in enumerate(spec[name]):
            assert_bitwise(b[name][i], p.values, f"{name}[{i}]")


# ------------------------------------------- refusals, and the rounding key


def backends(emu):
    return [("cpu", CPU), ("cuda (emulated)", emu)]


@pytest.mark.parametrize("op", ["adam_", "sgd_", "clip_"])
def test_refused_dtype_writes_nothing(emu, op):
    """A list with a dtype the kernels do not take (float8) is refused
    before anything is written, on both backends: earlier tensors of other
    dtypes keep their values and the step counters do not advance."""
    for name, ops in backends(emu):
        gen = torch.Generator().manual_seed(15)
        spec = adam_spec(torch.float32, gen, shapes=[(40,), (3,)])
        lists = make_lists(spec)
        for k in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
            lists[k].append(torch.randn(5).to(torch.float8_e4m3fn))
        lists["state_steps"].append(torch.tensor(4.0))
        with pytest.raises(RuntimeError, match="Float8_e4m3fn"):
            if op == "adam_":
                adam_call(ops, lists, adam_kwargs(weight_decay=0.1, decay_mode=1))
            elif op == "sgd_":
                ops.sgd_(lists["params"], lists["grads"], lists["exp_avgs"], [False] * 3,
                         master_params=[], state_steps=[], sr_ids=[], **sgd_kwargs(momentum=0.9))
            else:
                ops.clip_(lists["params"], torch.tensor(100.0), 1.0)
        for k in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
            for i, p in enumerate(spec[k]):
                assert_bitwise(lists[k][i], p.values, f"{name} {op}: {k}[{i}]")


@pytest.mark.parametrize("which", ["params", "grads", "exp_avg_sqs", "state_steps"])
def test_freed_storage_is_refused_and_writes_nothing(emu, which):
    """A tensor whose storage was freed after it was made (resized to 0, as
    FSDP does to unsharded params) is refused, naming the list and index,
    before anything is written, on both backends (the CUDA code checks the
    storages while it packs, and packs every table before the first launch)."""
    for name, ops in backends(emu):
        gen = torch.Generator().manual_seed(17)
        spec = adam_spec(torch.float32, gen, shapes=[(40,), (3,), (7,)])
        lists = make_lists(spec)
        lists[which][2].untyped_storage().resize_(0)
        with pytest.raises(RuntimeError, match=rf"{which}\[2\] .*resized or freed"):
            adam_call(ops, lists, adam_kwargs(weight_decay=0.1, decay_mode=1))
        for k in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
            for i, p in enumerate(spec[k][:2]):
                assert_bitwise(lists[k][i], p.values, f"{name}: {k}[{i}]")


@pytest.mark.parametrize("which", ["params", "exp_avgs", "master_params", "state_steps"])
def test_freed_storage_in_a_later_table_is_refused_and_writes_nothing(emu, which):
    """The CUDA code checks the storages while it packs its tables, and
    packs every table of a call (every dtype group, and the step counters')
    before the first launch: a freed storage at entry 125 of 130 (the third
    table of the emulated build's 4 KB tables), in a call with two layouts,
    is refused naming the list and index, and nothing is written."""
    shapes = [(5 + i % 7,) for i in range(130)]
    for name, ops in backends(emu):
        gen = torch.Generator().manual_seed(23)
        spec = adam_spec(torch.bfloat16, gen, shapes=shapes[:65], state_dtype=torch.float32, master=True)
        # the second half keeps its moments in bf16: a second launch group
        for k, v in adam_spec(torch.bfloat16, gen, shapes=shapes[65:], master=True).items():
            spec[k] = spec[k] + v
        lists = make_lists(spec)
        lists[which][125].untyped_storage().resize_(0)
        with pytest.raises(RuntimeError, match=rf"{which}\[125\] .*resized or freed"):
            adam_call(ops, lists, adam_kwargs(weight_decay=0.1, decay_mode=1))
        for k in ("params", "exp_avgs", "exp_avg_sqs", "master_params", "state_steps"):
            for i, p in enumerate(spec[k][:120]):
                assert_bitwise(lists[k][i], p.values, f"{name}: {k}[{i}]")


def test_freed_step_counter_of_sgd_is_refused_and_writes_nothing(emu):
    """SGD with stochastic rounding on fp32 params reads its step counters
    only to advance them: a freed one is still refused before any launch."""
    shapes = [(9,)] * 70
    for name, ops in backends(emu):
        gen = torch.Generator().manual_seed(29)
        spec = sgd_spec(torch.float32, gen, shapes=shapes, sr=True)
        lists = make_lists(spec)
        lists["state_steps"][66].untyped_storage().resize_(0)
        with pytest.raises(RuntimeError, match=r"state_steps\[66\] .*resized or freed"):
            sgd_call(ops, lists, sgd_kwargs(momentum=0.9, stochastic_rounding=True, sr_seed=3),
                     [False] * len(shapes), sr_ids=range(len(shapes)))
        for k in ("params", "momentum_buffers", "state_steps"):
            for i, p in enumerate(spec[k][:66]):
                assert_bitwise(lists[k][i], p.values, f"{name}: {k}[{i}]")


def test_refused_layout_writes_nothing(emu):
    """A call mixing a supported layout with a refused one (fp16 params,
    fp16 states and an fp32 master) writes nothing on either backend."""
    for name, ops in backends(emu):
        gen = torch.Generator().manual_seed(16)
        spec = adam_spec(torch.bfloat16, gen, shapes=[(30,), (20,)], state_dtype=torch.float32,
                         master=True)
        bad = adam_spec(torch.float16, gen, shapes=[(10,)], master=True)
        lists = make_lists(spec)
        for k, v in make_lists(bad).items():
            lists[k] = lists[k] + v
        # the third entry's layout is refused, after two of another layout
        with pytest.raises(RuntimeError, match=r"params\[2\] .*not a supported layout"):
            adam_call(ops, lists, adam_kwargs(weight_decay=0.1, decay_mode=1))
        for k in ADAM_LISTS:
            for i, p in enumerate(spec[k]):
                assert_bitwise(lists[k][i], p.values, f"{name}: {k}[{i}]")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stochastic_rounding_key_advances_past_2_24(emu, optimizer):
    """float64 step counters keep the rounding key advancing where float32
    ones stop (2^24 + 1 == 2^24 in float32), and both backends derive the
    step the same way."""
    start = 2.0 ** 24 - 1
    results = []
    for name, ops in backends(emu):
        gen = torch.Generator().manual_seed(17)
        shapes = [(3000,), (17,)]
        if optimizer == "adam":
            spec = adam_spec(torch.bfloat16, gen, shapes=shapes, step=start)
            spec["state_steps"] = [Placed(torch.tensor(start, dtype=torch.float64), 0) for _ in shapes]
        else:
            spec = sgd_spec(torch.bfloat16, gen, shapes=shapes, sr=True)
            spec["state_steps"] = [Placed(torch.tensor(start, dtype=torch.float64), 0) for _ in shapes]
        lists = make_lists(spec)
        for _ in range(3):
            if optimizer == "adam":
                adam_call(ops, lists, adam_kwargs(lr=0.3, stochastic_rounding=True, sr_seed=3), [0, 1])
            else:
                sgd_call(ops, lists, sgd_kwargs(lr=0.3, momentum=0.9, stochastic_rounding=True, sr_seed=3),
                         [False, False], [0, 1])
        assert [float(s) for s in lists["state_steps"]] == [2.0 ** 24 + 2] * 2, name
        results.append(lists)
    for k in ("params", "state_steps"):
        for i, (x, y) in enumerate(zip(results[0][k], results[1][k])):
            assert_bitwise(y, x, f"{k}[{i}]")
    # the same inputs at steps 2^24 and 2^24 + 1 round differently
    outs = []
    for step in (2.0 ** 24, 2.0 ** 24 + 1):
        # 1 + 2^-9 lies between two bf16 values: rounded up with probability 1/4
        lists = dict(params=[torch.ones(4096, dtype=torch.bfloat16)],
                     grads=[torch.full((4096,), -2.0 ** -9, dtype=torch.bfloat16)],
                     momentum_buffers=[], master_params=[],
                     state_steps=[torch.tensor(step, dtype=torch.float64)])
        sgd_call(emu, lists, sgd_kwargs(lr=1.0, stochastic_rounding=True, sr_seed=3), [], [0])
        outs.append(lists["params"][0])
    assert 0.2 < (outs[0] > 1).float().mean() < 0.3 and not torch.equal(outs[0], outs[1])


# ------------------------------------------------ statistics of the pass
#
# stats[0][slot] is the sum of squares of the param values a step computes
# (the fp32 master's when there is one, before any rounding to 16-bit
# storage) and stats[1][slot] the sum of the exp_avg_sq values (before any
# rounding to the state storage; 0 for sgd_). Each thread sums its (at most
# 64 per chunk) elements in the math type before the float64 tree, so float
# math agrees with a float64 sum to 64 float roundings of positive terms:
STATS_RTOL = {torch.float32: 4e-6, torch.float64: 1e-13}
UNSET = -7.0  # what the stats tensor holds before a call


def stats_args(n, gen, extra=3):
    """A [2, n + extra] stats tensor (UNSET) and a permutation of slots."""
    slots = torch.randperm(n + extra, generator=gen)[:n].tolist()
    return torch.full((2, n + extra), UNSET, dtype=torch.float64), slots


def sumsq64(ts):
    return torch.tensor([float(t.double().pow(2).sum()) for t in ts], dtype=torch.float64)


def sum64(ts):
    return torch.tensor([float(t.double().sum()) for t in ts], dtype=torch.float64)


def assert_stats(stats, slots, psq, vsum, rtol, what):
    got = stats[:, slots]
    torch.testing.assert_close(got[0], psq, rtol=rtol, atol=0, msg=lambda m: f"{what}: sum p^2: {m}")
    torch.testing.assert_close(got[1], vsum, rtol=rtol, atol=0, msg=lambda m: f"{what}: sum v: {m}")
    unused = torch.ones(stats.shape[1], dtype=torch.bool)
    unused[slots] = False
    assert (stats[:, unused] == UNSET).all(), f"{what}: a slot of no param was written"


def upcast(spec):
    """The spec with every 16-bit tensor stored as float32: its Adam step
    computes the same float values (the math is float32 either way), without
    the rounding to storage, so its outputs are the values the statistics sum."""
    def up(p):
        v = p.values
        return Placed(v.float() if v.dtype in (torch.float16, torch.bfloat16) else v, p.offset)
    out = {k: [up(p) for p in v] for k, v in spec.items() if k not in ("state_steps", "master_params")}
    out["state_steps"] = spec["state_steps"]
    out["master_params"] = []
    if spec["master_params"]:
        out["params"] = [Placed(m.values, m.offset) for m in spec["master_params"]]
    return out


# (param dtype, state dtype, master, amsgrad)
STATS_ADAM = {
    "f32": (torch.float32, None, False, False),
    "f32-amsgrad": (torch.float32, None, False, True),
    "f64-amsgrad": (torch.float64, None, False, True),
    "bf16-master": (torch.bfloat16, torch.float32, True, False),
    "bf16-master-bf16states-amsgrad": (torch.bfloat16, torch.bfloat16, True, True),
    "f32-bf16states": (torch.float32, torch.bfloat16, False, False),
    "f16-f16": (torch.float16, None, False, False),
}


@pytest.mark.parametrize("variant", list(STATS_ADAM))
def test_adam_stats_match_float64(emu, variant):
    pdt, sdt, master, amsgrad = STATS_ADAM[variant]
    gen = torch.Generator().manual_seed(20)
    spec = adam_spec(pdt, gen, state_dtype=sdt, master=master, amsgrad=amsgrad)
    n = len(SHAPES)
    stats0, slots = stats_args(n, gen)
    kw = adam_kwargs(**for_dtype(dict(weight_decay=0.1, decay_mode=1, amsgrad=amsgrad), pdt))
    runs = {}
    for name, ops in [("cpu", CPU), ("emu", emu), ("emu again", emu)]:
        lists = make_lists(spec)
        stats = stats0.clone()
        adam_call(ops, lists, dict(kw, stats=stats, stat_slots=slots))
        runs[name] = (lists, stats)
    for name in ADAM_LISTS:  # the statistics change nothing else
        for i, (x, y) in enumerate(zip(runs["cpu"][0][name], runs["emu"][0][name])):
            assert_bitwise(whole(y), whole(x), f"{variant}: {name}[{i}]")
    assert_bitwise(runs["emu again"][1], runs["emu"][1], f"{variant}: stats of two runs")
    # the values before rounding: those of the same step on float32 storage
    plain = make_lists(upcast(spec))
    adam_call(CPU, plain, kw)
    psq, vsum = sumsq64(plain["params"]), sum64(plain["exp_avg_sqs"])
    rtol = STATS_RTOL[torch.float64 if pdt == torch.float64 else torch.float32]
    assert psq[3] == 0 and vsum[3] == 0  # the empty param
    assert_stats(runs["emu"][1], slots, psq, vsum, rtol, f"{variant} emulated")
    assert_stats(runs["cpu"][1], slots, psq, vsum, rtol, f"{variant} cpu")
    if sdt is None and not master and pdt in (torch.float32, torch.float64):
        # no rounding anywhere: the stored values themselves
        assert_stats(runs["emu"][1], slots, sumsq64(runs["emu"][0]["params"]),
                     sum64(runs["emu"][0]["exp_avg_sqs"]), rtol, f"{variant} stored")


# (param dtype, state dtype, master, momentum)
STATS_SGD = {
    "f32": (torch.float32, None, False, False),
    "f32-momentum": (torch.float32, None, False, True),
    "f64-momentum": (torch.float64, None, False, True),
    "bf16-master-momentum": (torch.bfloat16, torch.float32, True, True),
    "bf16-master": (torch.bfloat16, None, True, False),
}


@pytest.mark.parametrize("variant", list(STATS_SGD))
def test_sgd_stats_match_float64(emu, variant):
    pdt, sdt, master, momentum = STATS_SGD[variant]
    gen = torch.Generator().manual_seed(21)
    spec = sgd_spec(pdt, gen, state_dtype=sdt, master=master, momentum=momentum)
    n = len(SHAPES)
    stats0, slots = stats_args(n, gen)
    kw = sgd_kwargs(**for_dtype(dict(weight_decay=0.1, decay_mode=0, momentum=0.9 if momentum else 0.0),
                                pdt))
    is_new = [i % 2 == 0 for i in range(n)] if momentum else []
    runs = {}
    for name, ops in [("cpu", CPU), ("emu", emu), ("emu again", emu)]:
        lists = make_lists(spec)
        stats = stats0.clone()
        sgd_call(ops, lists, dict(kw, stats=stats, stat_slots=slots), is_new)
        runs[name] = (lists, stats)
    for name in SGD_LISTS:
        for i, (x, y) in enumerate(zip(runs["cpu"][0][name], runs["emu"][0][name])):
            assert_bitwise(whole(y), whole(x), f"{variant}: {name}[{i}]")
    assert_bitwise(runs["emu again"][1], runs["emu"][1], f"{variant}: stats of two runs")
    ref = runs["emu"][0]["master_params"] if master else runs["emu"][0]["params"]
    rtol = STATS_RTOL[torch.float64 if pdt == torch.float64 else torch.float32]
    zeros = torch.zeros(n, dtype=torch.float64)
    assert_stats(runs["emu"][1], slots, sumsq64(ref), zeros, rtol, f"{variant} emulated")
    assert_stats(runs["cpu"][1], slots, sumsq64(ref), zeros, rtol, f"{variant} cpu")


def test_stats_many_tensors_and_empty_params(emu):
    """More tensors than one table holds (several update launches, one
    reduction), tensors of several chunks, and more empty params than one
    reduction launch zeroes (their slots get 0)."""
    gen = torch.Generator().manual_seed(22)
    shapes = ([(int(n),) for n in torch.randint(1, 200, (150,), generator=gen)] + [(50000,), (16384,)]
              + [(0,)] * 260)
    order = torch.randperm(len(shapes), generator=gen).tolist()
    shapes = [shapes[i] for i in order]
    for pdt, sdt, master in [(torch.float32, None, False), (torch.bfloat16, torch.float32, True)]:
        spec = adam_spec(pdt, gen, shapes=shapes, state_dtype=sdt, master=master)
        stats, slots = stats_args(len(shapes), gen)
        kw = adam_kwargs(weight_decay=0.1, decay_mode=1)
        lists = make_lists(spec)
        adam_call(emu, lists, dict(kw, stats=stats, stat_slots=slots))
        ref = lists["master_params"] if master else lists["params"]
        assert_stats(stats, slots, sumsq64(ref), sum64(lists["exp_avg_sqs"]), STATS_RTOL[torch.float32],
                     f"x{len(shapes)} {pdt}")


def test_stats_of_a_param_do_not_depend_on_the_call(emu):
    """A param's sums are the same bits whether it is stepped alone or with
    others (other dtypes, other tables)."""
    gen = torch.Generator().manual_seed(23)
    shapes = [(40001,), (37, 19), (7,), (16385,)] + [(int(n),) for n in torch.randint(1, 50, (120,),
                                                                                       generator=gen)]
    spec = adam_spec(torch.float32, gen, shapes=shapes, amsgrad=True)
    # another dtype in the same call: a second launch group
    for k, dt in [("params", torch.float64), ("grads", torch.float64), ("exp_avgs", torch.float64),
                  ("exp_avg_sqs", torch.float64), ("max_exp_avg_sqs", torch.float64)]:
        spec[k][5] = Placed(spec[k][5].values.to(dt), spec[k][5].offset)
    kw = adam_kwargs(amsgrad=True, weight_decay=0.1, decay_mode=2, initial_lr=0.1)
    n = len(shapes)
    together = torch.full((2, n), UNSET, dtype=torch.float64)
    adam_call(emu, make_lists(spec), dict(kw, stats=together, stat_slots=list(range(n))))
    alone = torch.full((2, n), UNSET, dtype=torch.float64)
    for i in [0, 1, 3, 5, 7]:
        one = {k: v[i:i + 1] for k, v in spec.items()}
        adam_call(emu, make_lists(one), dict(kw, stats=alone, stat_slots=[i]))
        assert_bitwise(alone[:, i], together[:, i], f"param {i} alone vs in the call")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("why", ["found_inf", "nonfinite_norm"])
def test_stats_of_a_skipped_step_are_not_written(emu, optimizer, why):
    gen = torch.Generator().manual_seed(24)
    skip = (dict(found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0)) if why == "found_inf"
            else dict(grad_norm=torch.tensor(float("nan")), max_norm=1.0))
    n = len(SHAPES)
    for ops_name, ops in backends(emu):
        stats, slots = stats_args(n, gen)
        if optimizer == "adam":
            spec = adam_spec(torch.bfloat16, gen, state_dtype=torch.float32, master=True)
            lists = make_lists(spec)
            adam_call(ops, lists, dict(adam_kwargs(weight_decay=0.1, decay_mode=1, **skip), stats=stats,
                                       stat_slots=slots))
            names = ADAM_LISTS
        else:
            spec = sgd_spec(torch.float32, gen)
            lists = make_lists(spec)
            sgd_call(ops, lists, dict(sgd_kwargs(momentum=0.9, **skip), stats=stats, stat_slots=slots),
                     [False] * n)
            names = SGD_LISTS
        assert (stats == UNSET).all(), f"{ops_name}: a skipped step wrote stats"
        for name in names:
            for i, p in enumerate(spec[name]):
                assert_bitwise(lists[name][i], p.values, f"{ops_name}: {name}[{i}]")


def test_stats_bad_slots_are_refused_before_anything_is_written(emu):
    gen = torch.Generator().manual_seed(25)
    spec = adam_spec(torch.float32, gen, shapes=[(40,), (3,)])
    for name, ops in backends(emu):
        for stats, slots, match in [(torch.zeros(2, 2, dtype=torch.float64), [1, 1], "earlier param"),
                                    (torch.zeros(2, 2, dtype=torch.float64), [0, 2], "outside"),
                                    (torch.zeros(2, 2, dtype=torch.float32), [0, 1], "float64"),
                                    (torch.zeros(2, 2, dtype=torch.float64), [0], "one stat_slots")]:
            lists = make_lists(spec)
            before = stats.clone()
            with pytest.raises(RuntimeError, match=match):
                adam_call(ops, lists, dict(adam_kwargs(), stats=stats, stat_slots=slots))
            assert torch.equal(stats, before)
            for k in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
                for i, p in enumerate(spec[k]):
                    assert_bitwise(lists[k][i], p.values, f"{name}: {k}[{i}]")


# ---------------------------------------------------------------- wd_tensor

WD_CASES = {
    "l2": dict(decay_mode=0),
    "decoupled": dict(decay_mode=1),
    "independent": dict(decay_mode=2, initial_lr=0.2),
    "corrected": dict(decay_mode=3, initial_lr=0.2),
    "cautious": dict(decay_mode=1, cautious_wd=True),
}


@pytest.mark.parametrize("wd_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(WD_CASES))
@pytest.mark.parametrize("optimizer", ["adam", "adam-mixed", "sgd", "sgd-mixed"])
def test_wd_tensor_is_weight_decay(emu, optimizer, case, wd_dtype):
    """wd_tensor's value replaces weight_decay's (which still says whether
    there is decay): the same bits as that value passed as weight_decay,
    on the CPU op and on the CUDA code, which reads it on the device."""
    wd = torch.tensor(0.37, dtype=wd_dtype)
    value = float(wd)
    gen = torch.Generator().manual_seed(26)
    mixed = optimizer.endswith("mixed")
    pdt = torch.bfloat16 if mixed else torch.float32
    if optimizer.startswith("adam"):
        spec = adam_spec(pdt, gen, state_dtype=torch.float32 if mixed else None, master=mixed)
        names = ADAM_LISTS
        base = adam_kwargs(**for_dtype(WD_CASES[case], pdt))

        def call(ops, lists, **kw):
            adam_call(ops, lists, dict(base, **kw))
    else:
        spec = sgd_spec(pdt, gen, state_dtype=torch.float32 if mixed else None, master=mixed)
        names = SGD_LISTS
        base = sgd_kwargs(**for_dtype(dict(WD_CASES[case], momentum=0.9), pdt))

        def call(ops, lists, **kw):
            sgd_call(ops, lists, dict(base, **kw), [False] * len(SHAPES))
    runs = []
    for ops, kw in [(emu, dict(weight_decay=value)), (emu, dict(weight_decay=1.0, wd_tensor=wd)),
                    (CPU, dict(weight_decay=1.0, wd_tensor=wd)), (CPU, dict(weight_decay=value))]:
        lists = make_lists(spec)
        call(ops, lists, **kw)
        runs.append(lists)
    # the decay did act: without it the params get other bits
    nodecay = make_lists(spec)
    call(emu, nodecay, weight_decay=0.0)
    assert not all(torch.equal(x, y) for x, y in zip(nodecay["params"], runs[0]["params"]))
    for r in runs[1:]:
        for name in names:
            for i, (x, y) in enumerate(zip(runs[0][name], r[name])):
                assert_bitwise(whole(y), whole(x), f"{optimizer} {case}: {name}[{i}]")


def test_wd_tensor_with_zero_weight_decay_means_no_decay(emu):
    gen = torch.Generator().manual_seed(27)
    spec = adam_spec(torch.float32, gen)
    a, b = make_lists(spec), make_lists(spec)
    adam_call(emu, a, adam_kwargs(decay_mode=1))
    adam_call(emu, b, dict(adam_kwargs(decay_mode=1), wd_tensor=torch.tensor(0.5)))
    for name in ADAM_LISTS:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert_bitwise(y, x, f"{name}[{i}]")


# ------------------------------------------------------------- auto_decay

AUTO_PREP = {
    "plain": {},
    "scaled": dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0)),
    "found_inf": dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0)),
    "clip": dict(grad_norm=torch.tensor(3.5), max_norm=1.0),
    "clip_scaled": dict(grad_norm=torch.tensor(3.5), max_norm=1.0, grad_scale=torch.tensor(64.0),
                        found_inf=torch.tensor(0.0)),
    "nonfinite_norm": dict(grad_norm=torch.tensor(float("inf")), max_norm=1.0),
}


def auto_inputs(gen, n=9):
    stats = torch.rand(2, n, generator=gen, dtype=torch.float64) * 10
    stats[1] *= 1e-3
    grad_sumsq = torch.rand(n, generator=gen, dtype=torch.float64) * 5e3
    steps = torch.randint(0, 50, (n,), generator=gen).double()
    numels = torch.randint(1, 1000, (n,), generator=gen).double()
    return stats, grad_sumsq, steps, numels


@pytest.mark.parametrize("prep", list(AUTO_PREP))
@pytest.mark.parametrize("mode", [0, 1], ids=["scheduled", "adaptive"])
def test_auto_decay_matches_cpu(emu, mode, prep):
    gen = torch.Generator().manual_seed(28)
    ins = auto_inputs(gen)
    kw = dict(dict(grad_norm=None, max_norm=0.0, grad_scale=None, found_inf=None, skip_nonfinite=True),
              **AUTO_PREP[prep])
    out = []
    for _, ops in backends(emu):
        state = torch.tensor([0.25], dtype=torch.float64)
        vals = [ops.auto_decay(*ins, state, mode=mode, weight_decay=0.05, beta2=0.999, eps=1e-8, **kw)
                for _ in range(2)]  # twice: the adaptive mode's state moves on
        out.append((vals, state))
    for v in out[1][0]:
        assert v.dtype == torch.float64 and v.dim() == 0
    for (x, y) in zip(out[0][0], out[1][0]):
        assert_bitwise(y, x, f"auto_decay {mode} {prep}")
    assert_bitwise(out[1][1], out[0][1], "state")
    assert torch.isfinite(out[1][0][0]) and out[1][0][0] > 0
    skipped = prep in ("found_inf", "nonfinite_norm")
    if mode == 1:
        assert (out[1][1].item() == 0.25) == skipped


def test_auto_decay_of_no_params_matches_cpu(emu):
    empty = torch.zeros(0, dtype=torch.float64)
    for mode in (0, 1):
        vals = []
        for _, ops in backends(emu):
            state = torch.tensor([0.5], dtype=torch.float64)
            vals.append(ops.auto_decay(torch.zeros(2, 0, dtype=torch.float64), empty, empty, empty, state,
                                       mode=mode, weight_decay=0.1, beta2=0.99, eps=1e-8, grad_norm=None,
                                       max_norm=0.0, grad_scale=None, found_inf=None,
                                       skip_nonfinite=True))
        assert_bitwise(vals[1], vals[0], f"mode {mode}")


# ------------------------------------------------- grads read from the params


def own_grads(lists):
    """lists with each param given its grad, and no list of grads."""
    for p, g in zip(lists["params"], lists["grads"]):
        p.grad = g
    return dict(lists, grads=[])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_grads_from_params_match_explicit_grads(emu, optimizer):
    """grads_from_params=True: the CUDA code takes each param's own .grad,
    with the same bits as the same grads given as a list (misaligned
    grads and an empty param included)."""
    gen = torch.Generator().manual_seed(41)
    if optimizer == "adam":
        kw = adam_kwargs(**ADAM_OPTIONS["everything"])
        spec = adam_spec(torch.float32, gen, amsgrad=True)
        out = compare(spec, lambda a: adam_call(CPU, a, kw),
                      lambda b: adam_call(emu, own_grads(b), dict(kw, grads_from_params=True)),
                      ADAM_LISTS, "adam, grads from params")
    else:
        kw = sgd_kwargs(**SGD_OPTIONS["clip"])
        spec = sgd_spec(torch.float32, gen)
        is_new = [False] * len(SHAPES)
        out = compare(spec, lambda a: sgd_call(CPU, a, kw, is_new),
                      lambda b: sgd_call(emu, own_grads(b), dict(kw, grads_from_params=True), is_new),
                      SGD_LISTS, "sgd, grads from params")
    assert changed_fraction([p.values for p in spec["params"]], out["params"]) > 0.9


def test_grads_from_params_refuses_a_param_without_grad(emu):
    gen = torch.Generator().manual_seed(42)
    b = own_grads(make_lists(adam_spec(torch.float32, gen)))
    b["params"][4].grad = None
    before = [whole(t).clone() for t in b["params"]]
    with pytest.raises(RuntimeError, match=r"params\[4\] \(shape \[3, 4, 5\]\) has no grad"):
        adam_call(emu, b, dict(adam_kwargs(), grads_from_params=True))
    for t, w in zip(b["params"], before):
        assert_bitwise(whole(t), w, "param after a refused call")


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_of_grads_matches_norm_of_the_grads(emu, norm_type):
    gen = torch.Generator().manual_seed(43)
    params = [rand(s, torch.float32, gen) for s in SHAPES]
    grads = [rand(s, torch.float32, gen, scale=3.0) for s in SHAPES]
    for p, g in zip(params, grads):
        p.grad = g
    params[1].grad = None  # writes 0
    grads[1] = None
    index = [7 - i for i in range(len(SHAPES))]
    want = torch.full((len(SHAPES),), float("nan"), dtype=torch.float64)
    got = want.clone()
    emu.norm_partials_(grads, want, index, norm_type)
    emu.norm_partials_(params, got, index, norm_type, of_grads=True)
    assert_bitwise(got, want, "partials of the params' grads")
