"""Checkpoints, determinism, GradScaler, schedulers, torch.compile, opcheck,
clipping and the param-group helper."""
import copy
import functools
import math
import os
import subprocess
import sys

import pytest
import torch

import fused_wd
from conftest import DEVICES, TOL, adam_hyper, clone_leaves, make_grads, make_params, sgd_hyper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(opt, params, steps, start=0, seed=0):
    for s in range(start, start + steps):
        for p, g in zip(params, make_grads(params, s, seed)):
            p.grad = g
        opt.step()


def bits_equal(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


# ------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", [("AdamW", dict(amsgrad=True)), ("Adam", {}),
                                  ("SGD", dict(momentum=0.9))], ids=lambda p: p[0] if isinstance(p, tuple) else p)
@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
def test_state_dict_interchange(pair, direction, device):
    """Train 3 steps with one library, load its state_dict into the other,
    train 3 more: the same as 6 steps with torch alone."""
    name, extra = pair
    hp = dict(lr=0.01, weight_decay=0.05, **extra)
    ps = make_params(torch.float32, device)
    ref = clone_leaves(ps)
    opt_ref = getattr(torch.optim, name)(ref, **hp, foreach=False)
    train(opt_ref, ref, 6)

    first, second = (torch.optim, fused_wd) if direction == "torch->fused" else (fused_wd, torch.optim)
    kw = lambda lib: dict(foreach=False) if lib is torch.optim else {}  # noqa: E731
    a = clone_leaves(ps)
    opt_a = getattr(first, name)(a, **hp, **kw(first))
    train(opt_a, a, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    b = [x.detach().clone().requires_grad_(True) for x in a]
    opt_b = getattr(second, name)(b, **hp, **kw(second))
    opt_b.load_state_dict(sd)
    train(opt_b, b, 3, start=3)
    for x, y in zip(ref, b):
        torch.testing.assert_close(y, x, **TOL[torch.float32])
    for k, v in opt_b.state[b[0]].items():
        torch.testing.assert_close(v.cpu(), opt_ref.state[ref[0]][k].cpu(), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_bitwise_resume(cls, device):
    hp = dict(lr=0.01, weight_decay=0.1, max_grad_norm=0.5)
    if cls == "SGD":
        hp["momentum"] = 0.9
    ps = make_params(torch.float32, device)
    a = clone_leaves(ps)
    opt_a = getattr(fused_wd, cls)(a, **hp)
    train(opt_a, a, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    saved = [x.detach().clone() for x in a]
    train(opt_a, a, 4, start=3)
    b = [x.clone().requires_grad_(True) for x in saved]
    opt_b = getattr(fused_wd, cls)(b, **hp)
    opt_b.load_state_dict(sd)
    train(opt_b, b, 4, start=3)
    assert bits_equal(a, b)
    for x, y in zip(a, b):
        for k in opt_a.state[x]:
            assert torch.equal(opt_a.state[x][k], opt_b.state[y][k]), k


def test_state_keys_and_layout_match_torch():
    p = torch.nn.Parameter(torch.randn(3, 4))
    q = torch.nn.Parameter(torch.randn(3, 4))
    for ours, theirs in [(fused_wd.AdamW([p], amsgrad=True), torch.optim.AdamW([q], amsgrad=True)),
                         (fused_wd.SGD([p], momentum=0.9), torch.optim.SGD([q], momentum=0.9))]:
        p.grad, q.grad = torch.ones(3, 4), torch.ones(3, 4)
        ours.step()
        theirs.step()
        so, st = ours.state[p], theirs.state[q]
        assert set(so) == set(st)
        for k in st:
            assert so[k].shape == st[k].shape and so[k].dtype == st[k].dtype, k
        # every torch group key is present
        assert set(theirs.param_groups[0]) <= set(ours.param_groups[0])


# ------------------------------------------------------------ determinism

def test_bitwise_deterministic_across_runs_and_threads():
    ps = make_params(torch.float32, "cpu", shapes=[(300, 700), (70001,), (5,)])
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            a = clone_leaves(ps)
            opt = fused_wd.AdamW(a, lr=0.01, max_grad_norm=1.0)
            train(opt, a, 3)
            results.append(([x.detach().clone() for x in a], opt.last_grad_norm.clone()))
    finally:
        torch.set_num_threads(old)
    for params, norm in results[1:]:
        assert bits_equal(params, results[0][0])
        assert torch.equal(norm, results[0][1])


def test_norm_accurate_and_order_fixed():
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=g) for n in (1, 65535, 65536, 65537, 200003)]
    ref = torch.linalg.vector_norm(torch.cat(ts).double())
    n2 = fused_wd.multi_tensor_norm(ts, 2.0)
    assert n2.dtype == torch.float32 and n2.dim() == 0
    assert abs(n2.item() - ref.item()) <= 1e-6 * ref.item()
    ninf = fused_wd.multi_tensor_norm(ts, math.inf)
    assert ninf.item() == max(t.abs().max().item() for t in ts)
    mixed = [ts[0].double(), ts[1].half(), ts[2].bfloat16(), ts[3]]
    ref = torch.linalg.vector_norm(torch.cat([t.double() for t in mixed]))
    assert abs(fused_wd.multi_tensor_norm(mixed).item() - ref.item()) <= 1e-6 * ref.item()
    bad = [ts[0].clone(), ts[1].clone()]
    bad[1][7] = float("nan")
    assert fused_wd.multi_tensor_norm(bad, math.inf).isnan()
    assert fused_wd.multi_tensor_norm(bad, 2.0).isnan()
    bad[1][7] = float("inf")
    assert fused_wd.multi_tensor_norm(bad, math.inf).isinf()


ISA_SCRIPT = r"""
import sys, torch, fused_wd
sys.path.insert(0, sys.argv[1])
from conftest import make_params, make_grads
print(fused_wd._ext.C.cpu_isa())
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    ps = make_params(dtype, "cpu", shapes=[(129, 33), (1000,), (7,)])
    a = [p.clone().requires_grad_(True) for p in ps]
    opt = fused_wd.AdamW(a, lr=0.01, max_grad_norm=1.0, amsgrad=True)
    for s in range(3):
        for p, g in zip(a, make_grads(a, s)):
            p.grad = g
        opt.step()
    for p in a:
        print(dtype, p.detach().double().flatten().tolist()[:50], opt.last_grad_norm.item())
"""


def run_python(code, *args, timeout=120, **env):
    """`python -c code args` in a fresh interpreter with `env` added to the
    environment; the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-c", code, *args], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def run_on_isa(isa, script, *args, timeout=120):
    """The output lines after the first of `script` run with
    FUSED_WD_CPU_ISA=isa (the script prints the ISA it got first), or None
    when this CPU lacks the ISA."""
    r = run_python(script, *args, timeout=timeout, FUSED_WD_CPU_ISA=isa)
    if r.returncode != 0 and "lacks" in r.stderr:
        assert isa != "base", r.stderr
        return None
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == isa
    return lines[1:]


def run_on_each_isa(script, *args, timeout=120):
    """{isa: run_on_isa(isa, ...)} for each ISA this machine has."""
    outs = {isa: run_on_isa(isa, script, *args, timeout=timeout) for isa in ("base", "avx2", "avx512")}
    return {isa: out for isa, out in outs.items() if out is not None}


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_instruction_sets_give_identical_bits(isa):
    """The AVX2 and AVX-512 kernels agree bit for bit with the base ones (no
    FMA contraction; reductions in a fixed lane order)."""
    out = run_on_isa(isa, ISA_SCRIPT, os.path.dirname(__file__))
    if out is None:
        pytest.skip(f"this CPU lacks {isa}: nothing to compare the base kernels with")
    assert out == run_on_isa("base", ISA_SCRIPT, os.path.dirname(__file__))


CONVERSION_SCRIPT = r"""
import torch, fused_wd


def as_float(bits64):  # float32 tensor with these bit patterns (int64 in [0, 2^32))
    b = bits64 - (bits64 >= 2**31).long() * 2**32
    return b.to(torch.int32).view(torch.float32)


def edge_floats():
    g = torch.Generator().manual_seed(0)
    top = torch.arange(65536, dtype=torch.int64) << 16
    parts = [top | low for low in (0, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]  # bf16 ties and neighbours
    parts.append(torch.randint(0, 2**32, (1 << 18,), generator=g, dtype=torch.int64))
    halfs = torch.arange(65536, dtype=torch.int64).to(torch.int16).view(torch.float16).double()
    halfs = halfs[torch.isfinite(halfs)].unique()
    mids = ((halfs[1:] + halfs[:-1]) / 2).float()  # exact in float32: half ties
    mid_bits = mids.view(torch.int32).long() & 0xFFFFFFFF
    parts += [mid_bits, mid_bits + 1, mid_bits - 1]
    for v in (65504.0, 65519.0, 65519.99, 65520.0, 65536.0, 1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26):
        b = torch.tensor([v, -v], dtype=torch.float32).view(torch.int32).long() & 0xFFFFFFFF
        parts += [b, b + 1, b - 1]
    return as_float(torch.cat(parts))


def mismatches(got, want):
    nan = torch.isnan(want)
    wrong_nan = int((torch.isnan(got) != nan).sum())
    same = got[~nan].view(torch.int16) if got.element_size() == 2 else got[~nan].view(torch.int32)
    ref = want[~nan].view(torch.int16) if want.element_size() == 2 else want[~nan].view(torch.int32)
    return wrong_nan + int((same != ref).sum())


print(fused_wd._ext.C.cpu_isa())
x = edge_floats()
for dtype in (torch.bfloat16, torch.float16):
    # float -> 16 bit: the param written from an fp32 master by a step of lr 0
    p = torch.nn.Parameter(torch.zeros(x.numel(), dtype=dtype))
    opt = fused_wd.SGD([p], lr=0.0, master_weights=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.state[p]["master_param"].copy_(x)
    opt.step()
    put = mismatches(p.detach(), x.to(dtype))
    # 16 bit -> float: every bit pattern as a grad, kept by a new fp32 momentum buffer
    bits = torch.arange(65536, dtype=torch.int64).to(torch.int16).view(dtype)
    q = torch.nn.Parameter(torch.zeros(65536, dtype=dtype))
    opt = fused_wd.SGD([q], lr=0.0, momentum=0.5, state_dtype=torch.float32)
    q.grad = bits.clone()
    opt.step()
    get = mismatches(opt.state[q]["momentum_buffer"], bits.float())
    print(dtype, put, get, x.numel())
"""


def test_16_bit_rounding_matches_torch_on_every_isa():
    """The kernels' own float <-> fp16/bf16 conversions (branch-free bit
    operations, so that the fused loops vectorize) give torch's bits: every
    16-bit pattern read, and float32 values at every bf16 and fp16 tie, their
    neighbours, the fp16 subnormal and overflow edges and 2^18 random bit
    patterns written (NaN only as NaN: its payload is not specified)."""
    for isa, lines in run_on_each_isa(CONVERSION_SCRIPT, timeout=300).items():
        assert len(lines) == 2
        for line in lines:
            dtype, put, get, n = line.split()
            assert int(n) > 700_000
            assert (int(put), int(get)) == (0, 0), f"{isa} {dtype}: {put} writes, {get} reads differ"


def test_bad_isa_env_is_a_clear_error():
    r = run_python("import fused_wd; fused_wd._ext.C.cpu_isa()", FUSED_WD_CPU_ISA="sse9")
    assert r.returncode != 0 and "FUSED_WD_CPU_ISA must be" in r.stderr


# ------------------------------------------------------------ AMP

def _amp_run(opt_factory, inject_inf_at=None, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = opt_factory(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for s in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if s == inject_inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return model, opt, scaler


@pytest.mark.parametrize("clip", [None, 0.1])
def test_grad_scaler_matches_torch(clip):
    def theirs(ps):
        return torch.optim.AdamW(ps, lr=0.01, fused=True)

    def ours(ps):
        return fused_wd.AdamW(ps, lr=0.01, max_grad_norm=clip)

    if clip is not None:
        # torch needs an explicit unscale + clip; we fuse both
        def run_torch():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
            opt = theirs(model.parameters())
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
            x, y = torch.randn(32, 8), torch.randn(32, 4)
            for _ in range(4):
                opt.zero_grad()
                scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
            return model
        m_t = run_torch()
    else:
        m_t, _, _ = _amp_run(theirs)
    m_f, opt_f, _ = _amp_run(ours)
    for a, b in zip(m_t.parameters(), m_f.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not hasattr(opt_f, "grad_scale")  # GradScaler cleaned up after itself


def test_grad_scaler_found_inf_skips_step_on_device():
    m_a, opt_a, sc_a = _amp_run(lambda ps: fused_wd.AdamW(ps, lr=0.01), inject_inf_at=2, steps=3)
    m_b, opt_b, _ = _amp_run(lambda ps: fused_wd.AdamW(ps, lr=0.01), steps=2)
    # the skipped third step changed nothing, steps did not advance
    for a, b in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(a, b)
        assert opt_a.state[a]["step"].item() == 2
    assert sc_a.get_scale() == 2.0 ** 9


@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_nonfinite_norm_skips_bitwise(cls):
    kw = dict(lr=0.1, max_grad_norm=1.0, **(dict(momentum=0.9) if cls == "SGD" else {}))
    ps = make_params(torch.float32, "cpu")
    a = clone_leaves(ps)
    opt = getattr(fused_wd, cls)(a, **kw)
    train(opt, a, 2)
    before = [x.detach().clone() for x in a]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for p, g in zip(a, make_grads(a, 5)):
        p.grad = g
    a[0].grad[3, 3] = float("nan")
    opt.step()
    assert opt.last_grad_norm.isnan()
    assert bits_equal(a, before)
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(v, state_before[k][name]), name
    # with skip_nonfinite=False the NaN goes through, as with torch
    opt.param_groups[0]["skip_nonfinite"] = False
    opt.step()
    assert a[0].isnan().any()


# ------------------------------------------------------------ schedulers, lr, groups

@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_scheduler_and_tensor_lr(lr_kind):
    ps = make_params(torch.float32, "cpu")
    lr = 0.05 if lr_kind == "float" else torch.tensor(0.05)
    a, b = clone_leaves(ps), clone_leaves(ps)
    oa = torch.optim.AdamW(a, lr=lr if lr_kind == "float" else lr.clone(), foreach=False)
    ob = fused_wd.AdamW(b, lr=lr)
    sa = torch.optim.lr_scheduler.OneCycleLR(oa, max_lr=0.1, total_steps=10)
    sb = torch.optim.lr_scheduler.OneCycleLR(ob, max_lr=0.1, total_steps=10)
    for s in range(6):
        for p, q, g in zip(a, b, make_grads(ps, s)):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, **TOL[torch.float32])


def test_user_changes_lr_between_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fused_wd.SGD([p], lr=1.0)
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"] = 0.5
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(0.25)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -1.75))


def test_param_groups_differ_and_clip_is_global():
    ps = make_params(torch.float32, "cpu", shapes=[(20, 10), (10,), (5, 5)])
    a, b = clone_leaves(ps), clone_leaves(ps)
    oa = torch.optim.AdamW([{"params": a[:2], "lr": 0.01}, {"params": a[2:], "lr": 0.1, "weight_decay": 0.0}],
                           weight_decay=0.2, foreach=False)
    ob = fused_wd.AdamW([{"params": b[:2], "lr": 0.01}, {"params": b[2:], "lr": 0.1, "weight_decay": 0.0}],
                        weight_decay=0.2, max_grad_norm=0.3)
    for s in range(4):
        gs = make_grads(ps, s)
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(a, 0.3)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, **TOL[torch.float32])


def test_closure_runs_with_grad_enabled():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = fused_wd.Adam([p], lr=0.1)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0 and opt.state[p]["step"].item() == 1


def test_exception_in_closure_leaves_state_consistent():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fused_wd.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(KeyError):
        opt.step(lambda: (_ for _ in ()).throw(KeyError("boom")))
    after = opt.state_dict()
    assert torch.equal(before["state"][0]["exp_avg"], after["state"][0]["exp_avg"])
    assert before["state"][0]["step"].item() == after["state"][0]["step"].item() == 1


# ------------------------------------------------------------ compile, opcheck

def test_compiled_model_trains_with_fused_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    opt = fused_wd.AdamW(model.parameters(), lr=0.01, max_grad_norm=1.0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01, foreach=False)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for _ in range(5):
        for m, o, clip in ((compiled, opt, False), (ref, opt_ref, True)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            o.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compiled_step_traces_the_ops():
    """The fake kernels let dynamo/aot trace through the custom ops."""
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=[(4, 4), (3,)]))
    opt = fused_wd.AdamW(ps, lr=0.01, max_grad_norm=1.0)
    for p, g in zip(ps, make_grads(ps, 0)):
        p.grad = g
    opt.step()
    eager = copy.deepcopy(opt)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=False)
    step()
    eager.step()
    for a, b in zip(ps, eager.param_groups[0]["params"]):
        torch.testing.assert_close(a, b)


def _opcheck_samples(device, dtype):
    ps = make_params(dtype, device, shapes=[(5, 3), (4,)])
    gs = make_grads(ps, 0)
    z = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device=device) for _ in ps]
    norm = torch.tensor(3.0, device=device)
    return ps, gs, z, steps, norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    ps, gs, z, steps, norm = _opcheck_samples(device, dtype)
    ops = torch.ops.fused_wd
    torch.library.opcheck(ops.multi_tensor_norm.default, (gs, 2.0))
    torch.library.opcheck(ops.multi_tensor_norm.default, (gs, math.inf))
    torch.library.opcheck(ops.clip_.default, ([g.clone() for g in gs], norm, 1.0))
    partials = torch.zeros(3, dtype=torch.float64, device=device)
    for nt in (2.0, math.inf):
        torch.library.opcheck(ops.norm_partials_.default, (gs + [None], partials, [2, 0, 1], nt))
        torch.library.opcheck(ops.norm_from_partials.default, (partials, nt))
    torch.library.opcheck(ops.adam_.default, (
        [p.clone() for p in ps], gs, [t.clone() for t in z], [t.clone() for t in z],
        [t.clone() for t in z], [s.clone() for s in steps], [], []),
        adam_hyper(weight_decay=0.1, decay_mode=1, amsgrad=True, grad_norm=norm, max_norm=1.0))
    torch.library.opcheck(ops.sgd_.default, (
        [p.clone() for p in ps], gs, [t.clone() for t in z], [True, False], [], [], []),
        sgd_hyper(momentum=0.9, nesterov=True, weight_decay=0.1, grad_norm=norm, max_norm=1.0))


def test_update_op_defaults_are_the_plain_step():
    """The update ops' schemas default every switch and extra to the plain
    step (csrc/schema.h), and the optimizers leave out what equals the
    default: a call with only the required arguments equals one that spells
    out conftest's plain values, bit for bit, and the defaults are exactly
    those values."""
    required = {"lr", "beta1", "beta2", "eps", "weight_decay", "decay_mode", "momentum", "dampening",
                "nesterov"}
    for op, plain in ((torch.ops.fused_wd.adam_.default, adam_hyper()),
                      (torch.ops.fused_wd.sgd_.default, sgd_hyper())):
        kwonly = {a.name: a for a in op._schema.arguments if a.kwarg_only}
        for name, value in plain.items():
            a = kwonly[name]
            if name in required:
                assert not a.has_default_value(), name
            else:
                assert a.has_default_value() and a.default_value == value, (name, a.default_value, value)
    ps = make_params(torch.float32, "cpu", shapes=[(5, 3), (4,)])
    gs = make_grads(ps, 0)
    outs = []
    for spelled in (True, False):
        p = [x.clone() for x in ps]
        m, v = [torch.zeros_like(x) for x in ps], [torch.zeros_like(x) for x in ps]
        steps = [torch.zeros(()) for _ in ps]
        kw = adam_hyper(weight_decay=0.1, decay_mode=1) if spelled else dict(
            lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay_mode=1)
        extra = dict(sr_ids=[], stat_slots=[], stats=None, wd_tensor=None, grads_from_params=False) \
            if spelled else {}
        torch.ops.fused_wd.adam_(params=p, grads=gs, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=[],
                                 state_steps=steps, master_params=[], **extra, **kw)
        outs.append(p + m + v + steps)
    assert all(map(torch.equal, *outs))


# ------------------------------------------------------------ clip_grad_norm_

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_clip_grad_norm_matches_torch(norm_type, device):
    ps = make_params(torch.float32, device, shapes=[(30, 20), (7,), ()])
    a, b = clone_leaves(ps), clone_leaves(ps)
    for p, q, g in zip(a, b, make_grads(ps, 0)):
        p.grad, q.grad = g.clone(), g.clone()
    na = torch.nn.utils.clip_grad_norm_(a, 0.5, norm_type)
    nb = fused_wd.clip_grad_norm_(b, 0.5, norm_type)
    torch.testing.assert_close(nb, na)
    for p, q in zip(a, b):
        torch.testing.assert_close(q.grad, p.grad)
    assert not torch.equal(a[0].grad, make_grads(ps, 0)[0])  # it did clip


def test_clip_grad_norm_nonfinite_error():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        fused_wd.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert fused_wd.clip_grad_norm_([], 1.0).item() == 0.0
    # a NaN norm scales every grad by NaN, as torch does
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([1.0, float("nan"), 2.0])
    torch.nn.utils.clip_grad_norm_([a], 1.0)
    fused_wd.clip_grad_norm_([b], 1.0)
    assert a.grad.isnan().all() and b.grad.isnan().all()


def test_fused_clip_does_not_rewrite_grad():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    opt = fused_wd.SGD([p], lr=1.0, max_grad_norm=1.0)
    opt.step()
    assert torch.equal(p.grad, torch.full((3,), 10.0))
    torch.testing.assert_close(opt.last_grad_norm, torch.tensor(math.sqrt(300.0)))
    torch.testing.assert_close(p.detach(), 1 - torch.full((3,), 1 / math.sqrt(3.0)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ helpers, packaging

def test_param_groups_for_decay():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2, bias=False))
    model[4].weight.requires_grad_(False)
    decay, no_decay = fused_wd.param_groups_for_decay(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model[0].weight), id(model[1].weight)}
    assert ids(no_decay["params"]) == {id(model[1].bias), id(model[2].weight), id(model[2].bias),
                                       id(model[3].weight), id(model[3].bias)}
    opt = fused_wd.AdamW(fused_wd.param_groups_for_decay(model, 0.1), lr=1e-3)
    assert len(opt.param_groups) == 2


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "fused_wd", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backends compiled: cpu" in r.stdout and torch.__version__ in r.stdout


def test_missing_extension_is_a_clear_message():
    code = ("import sys, warnings; sys.modules['fused_wd._C'] = None\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); import fused_wd\n"
            "print(w[0].message)\n"
            "import torch\n"
            "p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)\n"
            "try:\n    fused_wd.AdamW([p]).step()\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "could not be loaded" in r.stdout and "pip install --no-build-isolation" in r.stdout
    assert "ERR fused_wd: the compiled extension" in r.stdout


def test_extension_built_for_another_torch_is_named():
    code = ("import importlib, warnings, torch, fused_wd, fused_wd._C as C, fused_wd._ext as ext\n"
            "C.torch_version = '2.0.0+old'\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); importlib.reload(ext)\n"
            "print(w[0].message)\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "built against torch 2.0.0+old" in r.stdout and torch.__version__ in r.stdout
    assert "pip install --no-build-isolation" in r.stdout


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_bias_correction_past_2_pow_24_steps(cls):
    """A float32 step counter stops advancing at 2^24 (as torch's does), but
    the bias corrections it feeds stay correct: the update matches float64
    math at the true step count."""
    gen = torch.Generator().manual_seed(24)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float32, generator=gen))
    opt = getattr(fused_wd, cls)([p], lr=1e-3, betas=(0.9, 0.9999999), weight_decay=0.0)
    g = torch.randn(64, generator=gen)
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    st["step"].fill_(2.0 ** 24)
    m0, v0 = st["exp_avg"].clone().double(), st["exp_avg_sq"].clone().double()
    p0 = p.detach().clone().double()
    opt.step()
    assert st["step"].item() == 2.0 ** 24  # float32 cannot count further
    t = 2.0 ** 24 + 1  # the true step
    b1, b2 = 0.9, 0.9999999
    m = b1 * m0 + (1 - b1) * g.double()
    v = b2 * v0 + (1 - b2) * g.double() ** 2
    expect = p0 - 1e-3 / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
    # The kernels compute in float32: with beta2 this close to 1 the update is
    # about 0.4 (m / sqrt(v_hat) is large), so p - update loses the low bits
    # of values near 1 to cancellation. A few float32 ulps of |p| <= 4 (ulp
    # 4.8e-7) is the bound; a bias correction taken at a wrong step (1 - b2**t
    # off by more than 1e-5) moves the update by more.
    torch.testing.assert_close(p.detach().double(), expect, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ reused lists

def test_replaced_state_tensor_is_used():
    """The kernels' lists are reused between steps; a state tensor the user
    replaces (or a state_dict loaded) is seen at the next step."""
    ps = clone_leaves(make_params(torch.float32, "cpu", shapes=[(6, 4), (5,)]))
    opt = fused_wd.AdamW(ps, lr=0.1)
    train(opt, ps, 2)
    fresh = torch.zeros_like(ps[0])
    opt.state[ps[0]]["exp_avg"] = fresh
    train(opt, ps, 1, start=2)
    assert fresh.abs().sum() > 0  # the new tensor was updated, not the old one
    sd = copy.deepcopy(opt.state_dict())
    train(opt, ps, 1, start=3)
    opt.load_state_dict(sd)
    assert opt.state[ps[0]]["exp_avg"] is not fresh
    before = opt.state[ps[0]]["exp_avg"].clone()
    train(opt, ps, 1, start=3)
    assert not torch.equal(opt.state[ps[0]]["exp_avg"], before)


def test_changing_options_and_grad_sets_between_steps():
    ps = make_params(torch.float32, "cpu", shapes=[(6, 4), (5,), (3,)])
    a, b = clone_leaves(ps), clone_leaves(ps)
    oa = torch.optim.Adam(a, lr=0.05, foreach=False)
    ob = fused_wd.Adam(b, lr=0.05)
    for s in range(6):
        if s == 3:  # amsgrad switched on mid-training
            oa.param_groups[0]["amsgrad"] = ob.param_groups[0]["amsgrad"] = True
            for x in a:  # torch does not create the new state itself
                if oa.state[x]:
                    oa.state[x]["max_exp_avg_sq"] = torch.zeros_like(x)
        for i, (x, y, g) in enumerate(zip(a, b, make_grads(ps, s))):
            if (s + i) % 3 == 0:  # a changing set of params has grads
                x.grad = y.grad = None
            else:
                x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, **TOL[torch.float32])
    assert "max_exp_avg_sq" in ob.state[b[0]]
