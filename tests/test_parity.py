"""Parity of fused_wd.Adam/AdamW/SGD with torch.optim (preceded by
torch.nn.utils.clip_grad_norm_ when clipping) over several steps, comparing
params and every state tensor, across the option matrix and dtypes."""
import ast
import functools
import inspect
import math

import pytest
import torch

import fused_wd
from conftest import DEVICES, FP16_CLIPPED_ADAM_EPS, clone_leaves, make_grads, make_params, tol_for

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLIPS = [None, (0.5, 2.0), (0.05, math.inf)]
NONE_GRAD = {1: (1, 3)}  # param 1 has no grad on steps 1 and 3


@functools.cache
def torch_fused_sgd_ok(device):
    """torch 2.13's fused CPU SGD gives wrong fp16/bf16 results (2.14 is
    right): probe it once per device (CUDA has its own kernels), with and without
    momentum, against the math."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, generator=g).bfloat16()
    grads = [torch.randn(64, generator=g).bfloat16() for _ in range(2)]
    for momentum in (0.0, 0.9):
        p = p0.clone().to(device).requires_grad_(True)
        opt = torch.optim.SGD([p], lr=0.5, momentum=momentum, fused=True)
        want, buf = p0.float(), None
        for gr in grads:
            p.grad = gr.to(device, copy=True)
            opt.step()
            buf = gr.float() if buf is None else (buf * momentum + gr.float()).bfloat16().float()
            want = (want - 0.5 * (buf if momentum else gr.float())).bfloat16().float()
        if not torch.allclose(p.detach().float().cpu(), want, rtol=1e-2, atol=1e-2):
            return False
    return True


def torch_kwargs(dtype, device, sgd=False, single_op=False):
    # torch's for-loop path computes fp16/bf16 in the storage dtype, its fused
    # path in fp32 like fused_wd: compare low precision with the fused one,
    # or with the for-loop where its update is one op (computed in fp32,
    # rounded once) when torch's fused SGD is broken.
    if dtype in (torch.float32, torch.float64):
        return dict(foreach=False)
    if sgd and not torch_fused_sgd_ok(device):
        if not single_op:
            pytest.skip(f"this torch's fused {device} SGD is wrong for fp16/bf16; "
                        "test_matches_reference covers the case")
        return dict(foreach=False)
    return dict(fused=True)


def assign_grads(params, grads, step):
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if step in NONE_GRAD.get(i, ()) else g.clone()


def run_pair(make_torch, make_fused, dtype, device, clip, steps=5, seed=0, torch_device=None):
    """Steps torch's side (`a`, on torch_device, default `device`) and
    fused_wd's (`b`, on `device`) on the same params and grads."""
    ps = make_params(dtype, device, seed)
    a = clone_leaves([p.to(torch_device or device) for p in ps])
    b = clone_leaves(ps)
    oa, ob = make_torch(a), make_fused(b)
    for s in range(steps):
        gs = make_grads(ps, s, seed)
        assign_grads(a, [g.to(torch_device or device) for g in gs], s)
        assign_grads(b, gs, s)
        if clip is not None:
            # (torch refuses the inf norm of an empty tensor; it adds nothing)
            torch.nn.utils.clip_grad_norm_([p for p in a if p.numel()], clip[0], clip[1])
        oa.step()
        ob.step()
    return a, b, oa, ob


def assert_same_state(a, b, oa, ob, dtype, clipped=False, tol=None):
    if tol is None:
        tol = tol_for(dtype, clipped)  # torch clips fp64 grads with an fp64 norm
    for x, y in zip(a, b):
        torch.testing.assert_close(y.cpu(), x.cpu(), **tol)
    for x, y in zip(a, b):
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k in sa:
            if sa[k] is None:
                assert sb[k] is None
                continue
            assert sb[k].shape == sa[k].shape and sb[k].dtype == sa[k].dtype, k
            torch.testing.assert_close(sb[k].cpu(), sa[k].cpu(), **tol, msg=lambda m: f"state {k}: {m}")


def clip_kwargs(clip):
    return {} if clip is None else dict(max_grad_norm=clip[0], norm_type=clip[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip2", "clipinf"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["Adam", "AdamW", "Adam-decoupled"])
def test_adam_parity(kind, weight_decay, maximize, amsgrad, clip, dtype, device):
    eps = FP16_CLIPPED_ADAM_EPS if dtype == torch.float16 and clip is not None else 1e-6
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize)
    if kind == "Adam":
        mk_t = lambda p: torch.optim.Adam(p, **hp, **torch_kwargs(dtype, device))  # noqa: E731
        mk_f = lambda p: fused_wd.Adam(p, **hp, **clip_kwargs(clip))  # noqa: E731
    elif kind == "AdamW":
        mk_t = lambda p: torch.optim.AdamW(p, **hp, **torch_kwargs(dtype, device))  # noqa: E731
        mk_f = lambda p: fused_wd.AdamW(p, **hp, **clip_kwargs(clip))  # noqa: E731
    else:
        mk_t = lambda p: torch.optim.AdamW(p, **hp, **torch_kwargs(dtype, device))  # noqa: E731
        mk_f = lambda p: fused_wd.Adam(p, **hp, weight_decay_mode="decoupled", **clip_kwargs(clip))  # noqa: E731
    a, b, oa, ob = run_pair(mk_t, mk_f, dtype, device, clip)
    assert_same_state(a, b, oa, ob, dtype, clip is not None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip2", "clipinf"])
@pytest.mark.parametrize("momentum,dampening,nesterov",
                         [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_parity(weight_decay, maximize, momentum, dampening, nesterov, clip, dtype, device):
    hp = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    kw = torch_kwargs(dtype, device, sgd=True, single_op=momentum == 0.0 and weight_decay == 0.0)
    a, b, oa, ob = run_pair(lambda p: torch.optim.SGD(p, **hp, **kw),
                            lambda p: fused_wd.SGD(p, **hp, **clip_kwargs(clip)), dtype, device, clip)
    assert_same_state(a, b, oa, ob, dtype, clip is not None)


@pytest.mark.parametrize("device", DEVICES)
def test_parity_is_not_vacuous(device):
    """The comparison fails for a wrong formula: AdamW vs Adam (decay placed
    differently) and a missing clip must both be caught."""
    hp = dict(lr=0.01, weight_decay=0.1)
    a, b, oa, ob = run_pair(lambda p: torch.optim.AdamW(p, **hp, foreach=False),
                            lambda p: fused_wd.Adam(p, **hp), torch.float32, device, None)
    with pytest.raises(AssertionError):
        assert_same_state(a, b, oa, ob, torch.float32)
    a, b, oa, ob = run_pair(lambda p: torch.optim.SGD(p, lr=0.1, foreach=False),
                            lambda p: fused_wd.SGD(p, lr=0.1), torch.float32, device, (0.5, 2.0))
    with pytest.raises(AssertionError):
        assert_same_state(a, b, oa, ob, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["l2", "decoupled", "independent", "l1", "l1_proximal"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "SGD"])
def test_matches_reference(cls, mode, dtype, device):
    """Every decay mode (independent has no torch counterpart) against
    fused_wd.reference, which computes in fp32 and rounds once like the
    kernels: tight tolerances also for fp16/bf16. The reference runs on the
    CPU, where each torch op rounds once; torch's CUDA kernels may fuse a
    multiply and an add into one FMA, which moves an fp32 intermediate by an
    ulp and, rarely, an fp16 result by one rounding (seen on an H200: one
    element of 703 after 5 Adam steps, while the CUDA kernels matched the
    CPU kernels bit for bit)."""
    hp = dict(lr=0.02, weight_decay=0.1, weight_decay_mode=mode, max_grad_norm=0.5)
    if cls == "SGD":
        hp.update(momentum=0.9, dampening=0.1)
    a, b, oa, ob = run_pair(lambda p: getattr(fused_wd.reference, cls)(p, **hp),
                            lambda p: getattr(fused_wd, cls)(p, **hp), dtype, device, None,
                            torch_device="cpu")
    assert_same_state(a, b, oa, ob, dtype, tol=tol_for(dtype, reference=True))


def test_independent_decay_uses_initial_lr():
    """independent: p *= 1 - wd * lr / initial_lr; with a scheduler that
    halves lr, the decay halves; with lr = initial_lr it equals decoupled
    decay with wd / lr."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = fused_wd.SGD([p], lr=0.5, weight_decay=0.1, weight_decay_mode="independent")
    p.grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.9))
    opt.param_groups[0]["lr"] = 0.25
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.9 * 0.95))


REFERENCE_CASES = [
    ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip2", "clipinf"])
@pytest.mark.parametrize("cls,hp", REFERENCE_CASES, ids=["adam", "adamw", "sgd", "nesterov"])
def test_reference_matches_torch(cls, hp, clip, dtype):
    """The oracle itself agrees with torch.optim (after clip_grad_norm_)."""
    a, b, oa, ob = run_pair(lambda p: getattr(torch.optim, cls)(p, **hp, foreach=False),
                            lambda p: getattr(fused_wd.reference, cls)(p, **hp, **clip_kwargs(clip)),
                            dtype, "cpu", clip)
    assert_same_state(a, b, oa, ob, dtype, clip is not None)


@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_reference_under_grad_scaler_matches_torch(cls):
    """With a GradScaler the oracle unscales, clips and skips an overflowed
    step inside its step() as torch does with unscale_, clip_grad_norm_ and
    the scaler's skip."""
    hp = dict(lr=0.05, weight_decay=0.1, **(dict(momentum=0.9) if cls == "SGD" else {}))
    ps = make_params(torch.float32, "cpu")
    a, b = clone_leaves(ps), clone_leaves(ps)
    oa = getattr(torch.optim, cls)(a, **hp, foreach=False)
    ob = getattr(fused_wd.reference, cls)(b, **hp, max_grad_norm=0.5)
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))
    for sc in (sa, sb):
        sc.scale(torch.ones(()))  # (scale() creates the scaler's state)
    for s in range(5):
        gs = make_grads(ps, s, scale=sa.get_scale())
        if s == 2:
            gs[0].view(-1)[0] = math.inf  # an overflow: both skip the step
        assign_grads(a, gs, s)
        assign_grads(b, gs, s)
        sa.unscale_(oa)
        torch.nn.utils.clip_grad_norm_(a, 0.5)
        sa.step(oa)
        sa.update()
        sb.step(ob)
        sb.update()
    assert sa.get_scale() == sb.get_scale() == 2.0 ** 9
    assert_same_state(a, b, oa, ob, torch.float32)


def test_reference_is_its_own_code():
    """fused_wd.reference shares nothing with the optimizers it checks: plain
    torch.optim.Optimizer subclasses, and it imports nothing of fused_wd."""
    for name in ("Adam", "AdamW", "SGD"):
        cls = getattr(fused_wd.reference, name)
        assert issubclass(cls, torch.optim.Optimizer)
        assert all(c.__module__ in ("fused_wd.reference", "torch.optim.optimizer", "builtins",
                                    "typing", "typing_extensions")
                   for c in cls.__mro__), cls.__mro__
    tree = ast.parse(inspect.getsource(fused_wd.reference))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and not [m for m in imported if m.startswith((".", "fused_wd"))], imported


@pytest.mark.parametrize("cls,hp", [("AdamW", dict(amsgrad=True)), ("SGD", dict(momentum=0.9))])
def test_reference_state_dict_is_torch_layout(cls, hp):
    """Its state_dict has torch's state keys and fused_wd's param-group keys,
    and loads into torch.optim and from it."""
    ps = make_params(torch.float32, "cpu")
    leaves = [clone_leaves(ps) for _ in range(3)]
    opts = [getattr(torch.optim, cls)(leaves[0], **hp, foreach=False),
            getattr(fused_wd, cls)(leaves[1], **hp), getattr(fused_wd.reference, cls)(leaves[2], **hp)]
    for s in range(2):
        gs = make_grads(ps, s)
        for params, opt in zip(leaves, opts):
            assign_grads(params, gs, s)
            opt.step()
    sd_torch, sd_fused, sd_ref = (opt.state_dict() for opt in opts)
    assert sd_ref["param_groups"][0].keys() == sd_fused["param_groups"][0].keys()
    assert sd_ref["param_groups"][0].keys() >= sd_torch["param_groups"][0].keys()
    assert sd_ref["state"].keys() == sd_torch["state"].keys() == sd_fused["state"].keys()
    for i, st in sd_ref["state"].items():
        assert list(st) == list(sd_torch["state"][i]), i
        assert all(st[k].dtype == v.dtype for k, v in sd_torch["state"][i].items())
    back = getattr(torch.optim, cls)(clone_leaves(ps), **hp, foreach=False)
    back.load_state_dict(sd_ref)
    ref = getattr(fused_wd.reference, cls)(clone_leaves(ps), **hp)
    ref.load_state_dict(sd_torch)
    assert ref.param_groups[0]["max_grad_norm"] is None  # the extras from the defaults


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("beta1", [0.9, 0.5, 0.3, -0.6])
def test_exp_avg_follows_lerps_two_formulas_bit_for_bit(beta1, dtype, device):
    """exp_avg moves by torch.lerp's scalar formula with weight w = 1 - beta1
    (float32): m + w * (g - m) when |w| < 0.5, else g - (g - m) * (1 - w),
    each operation rounded on its own (no fused multiply-add), then stored in
    the state's dtype; bit for bit on both formulas, with inf, nan and signed
    zeros among the values. (torch's own CPU lerp fuses the multiply-add
    where the CPU has FMA, so it is not the reference here.)"""
    g = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(1000, generator=g).to(dtype=dtype, device=device))
    opt = fused_wd.Adam([p], lr=0.01, betas=(0.9, 0.99))
    p.grad = torch.zeros_like(p)
    opt.step()  # creates the state
    m = (10 * torch.randn(1000, generator=g)).to(dtype=dtype, device=device)
    grad = torch.randn(1000, generator=g).to(dtype=dtype, device=device)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 0.0, -0.0])
    m[:7] = specials.to(dtype)
    grad[:7] = specials.flip(0).to(dtype)
    opt.state[p]["exp_avg"].copy_(m)
    opt.param_groups[0]["betas"] = (beta1, 0.99)  # past the constructor's range check, as a scheduler may
    p.grad = grad.clone()
    opt.step()
    w = torch.tensor(1 - beta1, dtype=torch.float32)
    mf, gf = m.float().cpu(), grad.float().cpu()
    diff = gf - mf
    want = mf + w * diff if abs(w.item()) < 0.5 else gf - diff * (1 - w)
    want = want.to(dtype)
    got = opt.state[p]["exp_avg"].cpu()
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))
