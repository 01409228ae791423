"""docs/design.md, "The math", in plain PyTorch: the oracle of the tests and a
baseline of the benchmarks.

`reference.Adam`, `reference.AdamW` and `reference.SGD` take the public
arguments of their fused namesakes and keep the same state (torch's keys, plus
"master_param" with master weights) and param groups, but share no code with
them: each subclasses torch.optim.Optimizer and spells the step out per
parameter, one tensor operation per line, in float32 (float64 for float64
parameters), rounding once to the storage dtype. Stochastic rounding uses the
kernels' counter-based bits (csrc/fused_wd/math.h), computed here with torch
integer ops.
"""
import math
import sys

import torch
from torch.optim import Optimizer

_MODES = ("l2", "decoupled", "independent", "corrected", "l1", "l1_proximal")
_COUPLED = ("l2", "l1")  # the decay is part of the gradient
_LOW = (torch.float16, torch.bfloat16)
_MASTER = "master_param"


# ------------------------------------------------------------------ tensors

def _dtensor_class():
    """DTensor once torch.distributed.tensor has been imported (by whoever
    made one), else None: no DTensor can exist before."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _view(t, dtensor):
    """What the math runs on: the local shard of a DTensor, the real view of
    a complex tensor (both share t's storage)."""
    if dtensor is not None and isinstance(t, dtensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def _f32(x):
    """x rounded to a float32 value (returned as a Python float)."""
    return torch.tensor(x, dtype=torch.float32).item()


def _number(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _is_dense(t):
    """t's elements fill its memory without gaps or overlaps."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# ------------------------------------------------------- stochastic rounding

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _sr_key(seed, param_index, step):
    k = _mix64(seed + _GOLDEN)
    k = _mix64(k + (param_index + 1) * _GOLDEN)
    return _mix64(k + (step + 1) * _GOLDEN)


def _mul32(x, c):
    """(x * c) mod 2**32 for an int64 tensor x in [0, 2**32) and c < 2**32,
    without overflowing int64: c is split in 16-bit halves."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & 0xFFFFFFFF


def _random_bits(key, index):
    """16 random bits per element: index is the element's position (int64),
    key the stream of its tensor at this step; each 2**32 elements get a
    key of their own."""
    hi, lo = index >> 32, index & 0xFFFFFFFF
    n_hi = int(hi.max()) + 1
    keys = [(_mix64(key + (h + 1) * _GOLDEN) >> 32) & 0xFFFFFFFF for h in range(n_hi)]
    rk = keys[0] if n_hi == 1 else torch.tensor(keys, device=index.device)[hi]
    x = _mul32(lo, 0x9E3779B9) ^ rk
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x >> 16


def _round_stochastic(x, bits16):
    """float32 -> bfloat16: add the random bits below the kept mantissa and
    truncate; inf and NaN as round-to-nearest (NaN -> 0x7FC0)."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + bits16) >> 16
    special = torch.where((u & 0x7FFFFF) != 0, torch.full_like(u, 0x7FC0), u >> 16)
    out = torch.where((u & 0x7F800000) == 0x7F800000, special, rounded)
    out = torch.where(out >= 32768, out - 65536, out)
    return out.to(torch.int16).view(torch.bfloat16)


def _element_index(p, companions):
    """The position of each element of p in the stream of random bits: its
    place in memory when p and every tensor updated with it share one dense
    layout, else its row-major place (the kernels then work on contiguous
    copies)."""
    n = p.numel()
    ar = torch.arange(n, device=p.device)
    if _is_dense(p) and all(t.stride() == p.stride() for t in companions):
        return ar.as_strided(p.shape, p.stride())
    return ar.reshape(p.shape)


# --------------------------------------------------------------------- norm

def _local_norm(grads, norm_type):
    """Per-tensor norms in float64, then the norm of the norms (float64)."""
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.double(), norm_type).to(device) for g in grads if g.numel()]
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _sharded_norm(grads, norm_type, dtensor):
    """The global norm of grads of which some are DTensors, with one
    all-reduce over the world: every rank adds what it holds, each piece
    weighted by 1 / (the number of ranks that hold a copy of it); a max
    needs no weights. Meshes must span the world."""
    import torch.distributed as dist

    world = dist.get_world_size()
    inf = norm_type == math.inf
    comm = torch.device(next(g for g in grads if isinstance(g, dtensor)).device_mesh.device_type)
    parts = []
    for g in grads:
        copies = world
        if isinstance(g, dtensor):
            mesh = g.device_mesh
            if mesh.size() != world:
                raise NotImplementedError("fused_wd.reference: a DTensor mesh must span the world")
            copies = 1
            for d, pl in enumerate(g.placements):
                if pl.is_replicate():
                    copies *= mesh.size(d)
                elif not pl.is_shard():
                    raise ValueError(f"fused_wd.reference: cannot take the norm of a grad placed {pl}")
        local = _view(g, dtensor)
        if local.numel() == 0:
            continue
        n = torch.linalg.vector_norm(local.double(), norm_type).to(comm)
        parts.append(n if inf else n * n / copies)
    if inf:
        part = torch.stack(parts).max() if parts else torch.zeros((), dtype=torch.float64, device=comm)
        # MAX may drop a NaN: send "a NaN was seen" along
        nan = torch.isnan(part)
        buf = torch.stack([torch.where(nan, torch.zeros_like(part), part), nan.double()])
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        total = torch.where(buf[1] > 0, torch.full_like(buf[0], math.nan), buf[0])
    else:
        buf = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=comm)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        total = buf.sqrt()
    return total.to(_view(grads[0], dtensor).device)


# ---------------------------------------------------------------- optimizer

class _Reference(Optimizer):
    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale / found_inf
    _default_mode = "l2"

    def __init__(self, params, defaults):
        if defaults["differentiable"]:
            raise RuntimeError("fused_wd.reference does not support differentiable=True")
        super().__init__(params, defaults)
        self.last_grad_norm = None

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._resolve(self.param_groups[-1])

    def _resolve(self, group):
        """Checks a group and fills in what it left to the class: the decay
        mode, the seed, the initial lr of independent and corrected decay."""
        if group["weight_decay_mode"] is None:
            group["weight_decay_mode"] = self._default_mode
        if group["weight_decay_mode"] not in _MODES:
            raise ValueError(f"weight_decay_mode must be one of {_MODES}, got {group['weight_decay_mode']!r}")
        group.setdefault("cautious_weight_decay", False)
        if group["cautious_weight_decay"] not in (False, True):
            raise ValueError(f"cautious_weight_decay must be a bool, got {group['cautious_weight_decay']!r}")
        if group["cautious_weight_decay"] and group["weight_decay_mode"] in _COUPLED + ("l1_proximal",):
            raise ValueError("cautious_weight_decay=True does not go with weight_decay_mode="
                             f"{group['weight_decay_mode']!r}")
        group["norm_type"] = float(group["norm_type"])
        if group["norm_type"] not in (2.0, math.inf):
            raise ValueError(f"norm_type must be 2.0 or inf, got {group['norm_type']!r}")
        if group["sr_seed"] is None:
            group["sr_seed"] = torch.initial_seed() % (1 << 62)
        if group["weight_decay_mode"] in ("independent", "corrected"):
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
            if _number(group["initial_lr"]) == 0.0:
                raise ValueError(f"weight_decay_mode={group['weight_decay_mode']!r} divides by the "
                                 "initial lr, which is 0")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim checkpoint lacks the extras
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._resolve(group)

    def load_state_dict(self, state_dict):
        """torch's, except that floating state keeps its saved dtype (torch
        casts it to the param's, which would round an fp32 master of a bf16
        param); step() converts what the group wants otherwise."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, saved in state_dict["state"].get(i, {}).items():
                now = self.state[p].get(key)
                if (key != "step" and isinstance(saved, torch.Tensor) and saved.is_floating_point()
                        and isinstance(now, torch.Tensor) and now.dtype != saved.dtype):
                    self.state[p][key] = saved.to(device=now.device, copy=True)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        # torch.optim's closure protocol; a GradScaler hands over its scale
        # and inf flag as attributes (_step_supports_amp_scaling)
        with torch.enable_grad():
            loss = None if closure is None else closure()
        grad_scale, found_inf = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        with_grad = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        norm = self._clip_norm([p.grad for ps in with_grad for p in ps], grad_scale)
        if norm is not None:
            self.last_grad_norm = norm
        inf_found = found_inf is not None and found_inf.item() != 0
        # GradScaler's 1 / scale: computed in double, used as a float32
        inv_scale = 1.0 if grad_scale is None else _f32(1.0 / grad_scale.double().item())
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        for group, params in zip(self.param_groups, with_grad):
            skip, coef = inf_found, 1.0
            if norm is not None and group["max_grad_norm"] is not None:
                n = norm.float().cpu()
                skip = skip or (group["skip_nonfinite"] and not bool(torch.isfinite(n)))
                # torch.nn.utils.clip_grad_norm_'s coefficient, in float32
                coef = torch.clamp(torch.reciprocal(n + 1e-6) * float(group["max_grad_norm"]), max=1.0).item()
            hp = self._hyper(group)
            for p in params:
                self._update(group, hp, p, skip, inv_scale, -coef if group["maximize"] else coef,
                             index[id(p)])
        return loss

    def _clip_norm(self, grads, grad_scale):
        """The global norm of every group's grads (unscaled), when some
        group clips; a float32 0-dim tensor on the first grad's device."""
        clipping = {g["norm_type"] for g in self.param_groups if g["max_grad_norm"] is not None}
        if not clipping or not grads:
            return None
        if len(clipping) > 1:
            raise ValueError(f"param groups that clip must share one norm_type, got {sorted(clipping)}")
        norm_type = clipping.pop()
        dtensor = _dtensor_class()
        if dtensor is not None and any(isinstance(g, dtensor) for g in grads):
            total = _sharded_norm(grads, norm_type, dtensor)
        else:
            total = _local_norm([_view(g, None) for g in grads], norm_type)
        if grad_scale is not None:
            total = total / grad_scale.to(total.device).double().reshape(())
        return total.float()

    def _hyper(self, group):
        """The group's scalars as Python floats (double)."""
        hp = dict(lr=_number(group["lr"]), wd=_number(group["weight_decay"]))
        if group["weight_decay_mode"] in ("independent", "corrected"):
            hp["initial_lr"] = _number(group.get("initial_lr", self.defaults["lr"]))
        return hp

    # ------------------------------------------------- per-parameter helpers

    @staticmethod
    def _has_master(group, p):
        return bool(group["master_weights"]) and p.dtype in _LOW

    def _state_dtype(self, group, p):
        if p.dtype not in _LOW + (torch.float32,):
            return p.dtype
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float32 if self._has_master(group, p) else p.dtype

    def _state(self, group, p, name):
        """state[name] in the dtype the group wants: created as zeros, or
        converted (e.g. a torch checkpoint's bf16 moments with fp32 wanted)."""
        state, want = self.state[p], self._state_dtype(group, p)
        s = state.get(name)
        if s is None:
            s = torch.zeros_like(p, dtype=want, memory_format=torch.preserve_format)
        elif s.dtype != want:
            s = s.to(want)
        state[name] = s
        return s

    def _master(self, group, p):
        """p's fp32 master copy (None without one); a missing one starts as p."""
        if not self._has_master(group, p):
            return None
        state = self.state[p]
        mp = state.get(_MASTER)
        state[_MASTER] = p.to(torch.float32, copy=True) if mp is None else mp.float()
        return state[_MASTER]

    def _step_counter(self, p):
        """torch's `step`: a 0-dim float32 tensor, here on p's device."""
        state = self.state[p]
        step = state.get("step", 0.0)
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(float(step))
        state["step"] = step.to(device=p.device, dtype=torch.float32).reshape(())
        return state["step"]

    @staticmethod
    def _grad(g, dt, inv_scale, coef):
        """Unscale, clip and maximize (coef carries the sign)."""
        g = g.to(dt) * inv_scale
        return g * coef

    @staticmethod
    def _decay(group, hp, x, g):
        """Weight decay before the update: into the grad (l2, l1) or onto
        the param; cautious decay is left to _cautious_decay, after the
        update direction is known, and proximal L1 to _proximal, after the
        update."""
        mode, wd = group["weight_decay_mode"], hp["wd"]
        if wd == 0.0 or group["cautious_weight_decay"] or mode == "l1_proximal":
            return x, g
        if mode == "l2":
            return x, g + wd * x
        if mode == "l1":
            return x, g + wd * torch.sign(x)  # the gradient of wd * |x|, sign(0) = 0
        return x * _Reference._shrink(mode, hp), g

    @staticmethod
    def _proximal(group, hp, x):
        """Proximal L1 after the update: x soft-thresholded by lr * wd."""
        if hp["wd"] == 0.0 or group["weight_decay_mode"] != "l1_proximal":
            return x
        return torch.sign(x) * torch.clamp(x.abs() - hp["lr"] * hp["wd"], min=0.0)

    @staticmethod
    def _shrink(mode, hp):
        """The factor that decoupled, independent and corrected decay
        multiply the param by."""
        wd, lr = hp["wd"], hp["lr"]
        if mode == "decoupled":
            return 1.0 - lr * wd
        if mode == "independent":
            return 1.0 - wd * lr / hp["initial_lr"]
        return 1.0 - wd * lr * lr / hp["initial_lr"]

    @staticmethod
    def _cautious_decay(group, hp, x, u):
        """Cautious decay: the shrink applies only where the update direction
        u (what the step subtracts, before the lr) and the param x agree in
        sign."""
        if hp["wd"] == 0.0 or not group["cautious_weight_decay"]:
            return x
        return torch.where(u * x >= 0, x * _Reference._shrink(group["weight_decay_mode"], hp), x)

    @staticmethod
    def _store(group, P, x, step, index, companions):
        """Writes the new value x into param view P: rounded stochastically
        (bf16 params without a master, in a stochastic_rounding group) or to
        nearest."""
        if group["stochastic_rounding"] and P.dtype == torch.bfloat16 and P.numel():
            key = _sr_key(int(group["sr_seed"]), index, int(step))
            bits = _random_bits(key, _element_index(P, companions))
            P.copy_(_round_stochastic(x.float(), bits))
        else:
            P.copy_(x)


class _AdamMath(_Reference):
    def _update(self, group, hp, p, skip, inv_scale, coef, index):
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        if "exp_avg" not in self.state[p]:
            self.state[p]["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        step = self._step_counter(p)
        states = [self._state(group, p, n) for n in names]
        master = self._master(group, p)
        if skip:
            return
        dt = _dtensor_class()
        P, G, mp = _view(p, dt), _view(p.grad, dt), None if master is None else _view(master, dt)
        M, V, *VM = [_view(s, dt) for s in states]
        ct = torch.float64 if P.dtype == torch.float64 else torch.float32
        beta1, beta2 = (_number(b) for b in group["betas"])
        eps, lr = _number(group["eps"]), hp["lr"]

        x = (P if mp is None else mp).to(ct)
        g = self._grad(G, ct, inv_scale, coef)
        x, g = self._decay(group, hp, x, g)
        step += 1
        t = step.item()
        m = torch.lerp(M.to(ct), g, 1.0 - beta1)
        v = V.to(ct) * beta2 + (1.0 - beta2) * g * g
        v_hat = v
        if VM:
            v_hat = torch.maximum(VM[0].to(ct), v)
            VM[0].copy_(v_hat)
        bias_correction1 = 1.0 - beta1 ** t
        bias_correction2 = 1.0 - beta2 ** t
        denom = v_hat.sqrt() / math.sqrt(bias_correction2) + eps
        u = m / denom
        x = self._cautious_decay(group, hp, x, u)
        x = x - (lr / bias_correction1) * u
        x = self._proximal(group, hp, x)
        M.copy_(m)
        V.copy_(v)
        if mp is not None:
            mp.copy_(x)
            P.copy_(x)
        else:
            self._store(group, P, x, t, index, [G, M, V] + VM)


class Adam(_AdamMath):
    """Reference Adam (the arguments of fused_wd.Adam)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, norm_type=2.0, weight_decay_mode=None, skip_nonfinite=True,
                 master_weights=False, state_dtype=None, stochastic_rounding=False, sr_seed=None,
                 cautious_weight_decay=False):
        if decoupled_weight_decay:
            if weight_decay_mode not in (None, "decoupled", "independent", "corrected"):
                raise ValueError(f"decoupled_weight_decay=True contradicts weight_decay_mode={weight_decay_mode!r}")
            weight_decay_mode = weight_decay_mode or "decoupled"
        mode = weight_decay_mode or self._default_mode
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=mode not in _COUPLED,
            max_grad_norm=max_grad_norm, norm_type=norm_type, weight_decay_mode=mode,
            skip_nonfinite=skip_nonfinite, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, sr_seed=sr_seed,
            cautious_weight_decay=cautious_weight_decay))


class AdamW(Adam):
    """Reference AdamW (the arguments of fused_wd.AdamW: Adam's, but a
    weight_decay of 1e-2 and decoupled decay by default)."""

    _default_mode = "decoupled"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, **options):
        if "decoupled_weight_decay" in options:
            raise TypeError("AdamW() got an unexpected keyword argument 'decoupled_weight_decay'")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **options)


class SGD(_Reference):
    """Reference SGD (the arguments of fused_wd.SGD)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, max_grad_norm=None, norm_type=2.0, weight_decay_mode=None,
                 skip_nonfinite=True, master_weights=False, state_dtype=None,
                 stochastic_rounding=False, sr_seed=None, cautious_weight_decay=False):
        if nesterov and (_number(momentum) <= 0 or _number(dampening) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused, max_grad_norm=max_grad_norm, norm_type=norm_type,
            weight_decay_mode=weight_decay_mode or self._default_mode,
            skip_nonfinite=skip_nonfinite, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, sr_seed=sr_seed,
            cautious_weight_decay=cautious_weight_decay))

    def _update(self, group, hp, p, skip, inv_scale, coef, index):
        momentum = _number(group["momentum"])
        master = self._master(group, p)
        # with stochastic rounding, `step` keys the bits of each update
        step = self._step_counter(p) if group["stochastic_rounding"] else None
        buf = None
        if momentum != 0.0:
            # a buffer made on a skipped step stays zero, and is decayed next time
            new = self.state[p].get("momentum_buffer") is None
            buf = self._state(group, p, "momentum_buffer")
        if skip:
            return
        dt = _dtensor_class()
        P, G, mp = _view(p, dt), _view(p.grad, dt), None if master is None else _view(master, dt)
        ct = torch.float64 if P.dtype == torch.float64 else torch.float32

        x = (P if mp is None else mp).to(ct)
        g = self._grad(G, ct, inv_scale, coef)
        x, g = self._decay(group, hp, x, g)
        if buf is not None:
            B = _view(buf, dt)
            b = g if new else B.to(ct) * momentum + (1.0 - _number(group["dampening"])) * g
            B.copy_(b)
            g = g + momentum * b if group["nesterov"] else b
        x = self._cautious_decay(group, hp, x, g)
        x = x - hp["lr"] * g
        x = self._proximal(group, hp, x)
        if mp is not None:
            mp.copy_(x)
            P.copy_(x)
            return
        t = None
        if step is not None:
            step += 1
            t = step.item()
        self._store(group, P, x, t, index, [G] + ([] if buf is None else [B]))
