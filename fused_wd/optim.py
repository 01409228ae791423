"""Drop-in replacements for torch.optim.Adam, AdamW and SGD whose step is one
fused pass per (param group, device): global-norm clipping, weight decay and
the update, in the fused_wd kernels.

Extra keyword-only options (per param group, in `defaults`):
  max_grad_norm=None    clip the global gradient norm to this (None: no clip)
  norm_type=2.0         2.0 or inf
  weight_decay_mode     "l2" | "decoupled" | "independent" (None: the class default)
  skip_nonfinite=True   skip the whole step when the global norm is not finite

Clipping does not rewrite p.grad: the clipped gradient only exists inside
the kernel. `last_grad_norm` holds the pre-clip global norm (a 0-dim tensor,
unscaled when a GradScaler drives the step).
"""
import math

import torch
from torch.optim import Optimizer

from fused_wd import _ext
from fused_wd import distributed as _dist
from fused_wd._ops import multi_tensor_norm

DECAY_MODES = {"l2": 0, "decoupled": 1, "independent": 2}
_EXTRA = ("max_grad_norm", "norm_type", "weight_decay_mode", "skip_nonfinite")


def _scalar(x, name):
    """A hyperparameter that torch accepts as a float or a 1-element tensor."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a float or a 1-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None


def _norm_type(norm_type):
    try:
        v = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}") from None
    if v != 2.0 and v != math.inf:
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    return v


def _check_lr(lr):
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be floating point, got {lr.dtype}")
        return
    if not 0.0 <= _scalar(lr, "lr"):
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_extras(max_grad_norm, norm_type, weight_decay_mode, skip_nonfinite, default_mode):
    if max_grad_norm is not None:
        if not isinstance(max_grad_norm, (int, float)) or isinstance(max_grad_norm, bool) \
                or not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        max_grad_norm = float(max_grad_norm)
    norm_type = _norm_type(norm_type)
    mode = default_mode if weight_decay_mode is None else weight_decay_mode
    if mode not in DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {sorted(DECAY_MODES)} or None, got {weight_decay_mode!r}")
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    return dict(max_grad_norm=max_grad_norm, norm_type=norm_type, weight_decay_mode=mode,
                skip_nonfinite=skip_nonfinite)


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _local_real(t):
    """What the kernels get of a DTensor (FSDP2): its local shard, real."""
    return _real(_dist.local(t))


class _FusedOptimizer(Optimizer):
    """What Adam, AdamW and SGD share: argument handling, state checks, the
    global norm and the per-(group, device) dispatch. Subclasses provide
    `_init_group` (state, lazily, with torch's keys; `view` maps each param,
    grad and state to what the kernels get) and `_update`."""

    _step_supports_amp_scaling = True
    _default_mode = "l2"

    def __init__(self, params, defaults):
        if defaults.get("differentiable"):
            raise RuntimeError(f"fused_wd.{type(self).__name__} does not support differentiable=True")
        super().__init__(params, defaults)
        self.last_grad_norm = None

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _EXTRA:
                group.setdefault(key, self.defaults.get(key))
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("differentiable", False)
            if group["weight_decay_mode"] is None:
                group["weight_decay_mode"] = self._default_mode

    def add_param_group(self, param_group):
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen = set()
        for p in params:
            if isinstance(p, torch.Tensor):
                if id(p) in seen:
                    raise ValueError(
                        f"fused_wd.{type(self).__name__}: a parameter (shape {tuple(p.shape)}) appears "
                        "twice in one param group; pass each parameter once")
                seen.add(id(p))
        param_group = dict(param_group, params=params)
        mode = param_group.get("weight_decay_mode", self.defaults.get("weight_decay_mode"))
        if mode is not None and mode not in DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {sorted(DECAY_MODES)}, got {mode!r}")
        if "norm_type" in param_group:
            param_group["norm_type"] = _norm_type(param_group["norm_type"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["weight_decay_mode"] == "independent":
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
            if _scalar(group["initial_lr"], "initial_lr") == 0.0:
                raise ValueError("weight_decay_mode='independent' divides by the initial lr, "
                                 "which is 0 here; give a nonzero lr")

    # ------------------------------------------------------------------ step

    def _grads_of(self, group, gi):
        """(param, grad) pairs of a group with a grad, real views of complex."""
        out = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"fused_wd.{type(self).__name__} does not support sparse gradients "
                    f"(param group {gi}, shape {tuple(p.shape)})")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(
                    f"fused_wd.{type(self).__name__}: param group {gi}: a parameter of shape "
                    f"{tuple(p.shape)} and dtype {p.dtype} has a grad of shape {tuple(g.shape)} "
                    f"and dtype {g.dtype}")
            out.append((p, g))
        return out

    @staticmethod
    def _step_tensor(state, p):
        """torch's 0-dim float32 `step`, kept on the param's device."""
        step = state.get("step")
        if step is None:
            step = torch.zeros((), dtype=torch.float32, device=p.device)
        elif not isinstance(step, torch.Tensor):
            step = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        elif step.device != p.device or step.dtype != torch.float32 or step.dim() != 0:
            step = step.to(device=p.device, dtype=torch.float32).reshape(())
        state["step"] = step
        return step

    @staticmethod
    def _check_state(name, s, p, gi):
        if s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
            raise RuntimeError(
                f"param group {gi}: optimizer state '{name}' has shape {tuple(s.shape)}, dtype "
                f"{s.dtype}, device {s.device}, but its parameter has shape {tuple(p.shape)}, dtype "
                f"{p.dtype}, device {p.device} (the parameter changed after its state was created, "
                "or a checkpoint of another model was loaded)")

    def _global_norm(self, per_group, grad_scale, sharded=False):
        """The pre-clip global norm over the grads of every group, unscaled;
        across ranks when `sharded` (DTensors: one local pass, one all-reduce)."""
        clipping = [g for g in self.param_groups if g["max_grad_norm"] is not None]
        if not clipping:
            return None
        norm_types = {g["norm_type"] for g in clipping}
        if len(norm_types) > 1:
            raise ValueError(f"param groups that clip must share one norm_type, got {sorted(norm_types)}")
        if sharded:
            grads = [g for pairs in per_group for _, g in pairs]
            norm = _dist.global_norm(grads, norm_types.pop(), self._norm, _real) if grads else None
        else:
            grads = [_real(g) for pairs in per_group for _, g in pairs]
            norm = self._norm(grads, norm_types.pop()) if grads else None
        if norm is None:
            return None
        if grad_scale is not None:
            norm = norm / grad_scale.to(norm.device, non_blocking=True).reshape(())
        return norm

    def _norm(self, grads, norm_type):
        return multi_tensor_norm(grads, norm_type)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; `closure` (re)computes the loss under autograd."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        per_group = [self._grads_of(group, gi) for gi, group in enumerate(self.param_groups)]
        # DTensor params (FSDP2): the kernels get local shards; one isinstance
        # per param is all the plain (single process, DDP) path pays
        sharded = _dist.refresh() and _dist.any_dtensor(p for pairs in per_group for p, _ in pairs)
        norm = self._global_norm(per_group, grad_scale, sharded)
        if norm is not None:
            self.last_grad_norm = norm
        for gi, (group, pairs) in enumerate(zip(self.param_groups, per_group)):
            if not pairs:
                continue
            by_device = {}
            for p, g in pairs:
                by_device.setdefault(p.device, []).append((p, g))
            for device, dev_pairs in by_device.items():
                if sharded:
                    _dist.check_layouts(type(self).__name__, dev_pairs, self.state, gi)
                    lists = self._init_group(group, dev_pairs, gi, _local_real)
                else:
                    lists = self._init_group(group, dev_pairs, gi)
                kw = self._common_kwargs(group, device, norm, grad_scale, found_inf)
                self._update(group, lists, kw, gi)
        return loss

    def _common_kwargs(self, group, device, norm, grad_scale, found_inf):
        def on_device(t):
            return None if t is None else t.to(device, non_blocking=True)

        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, torch.Tensor):
            lr_tensor = lr if lr.device == device or lr.device.type == "cpu" else lr.to(device)
            lr = 0.0
        mode = group["weight_decay_mode"]
        initial_lr = 1.0  # read by the kernels in "independent" mode only
        if mode == "independent":
            # a tensor initial_lr (set by a scheduler for a tensor lr) is read
            # on the host here: one sync per step in this mode alone
            initial_lr = _scalar(group.get("initial_lr", self.defaults["lr"]), "initial_lr")
            if initial_lr == 0.0:
                raise ValueError("weight_decay_mode='independent' needs a nonzero initial_lr")
        clip = group["max_grad_norm"] is not None and norm is not None
        return dict(
            lr=float(lr), lr_tensor=lr_tensor,
            weight_decay=_scalar(group["weight_decay"], "weight_decay"),
            decay_mode=DECAY_MODES[mode], initial_lr=initial_lr, maximize=bool(group["maximize"]),
            grad_norm=on_device(norm) if clip else None,
            max_norm=float(group["max_grad_norm"]) if clip else 0.0,
            grad_scale=on_device(grad_scale), found_inf=on_device(found_inf),
            skip_nonfinite=bool(group["skip_nonfinite"]),
        )

    def _call(self, op_name, gi, *args):
        _ext.require()
        try:
            getattr(torch.ops.fused_wd, op_name)(*args)
        except RuntimeError as e:
            raise RuntimeError(f"fused_wd.{type(self).__name__}, param group {gi}: {e}") from e


class _AdamBase(_FusedOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, norm_type=2.0, weight_decay_mode=None, skip_nonfinite=True):
        _check_lr(lr)
        if not 0.0 <= _scalar(eps, "eps"):
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= _scalar(betas[i], f"betas[{i}]") < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= _scalar(weight_decay, "weight_decay"):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        default_mode = "decoupled" if decoupled_weight_decay else self._default_mode
        if decoupled_weight_decay and weight_decay_mode not in (None, "decoupled", "independent"):
            raise ValueError("decoupled_weight_decay=True contradicts weight_decay_mode="
                             f"{weight_decay_mode!r}")
        extras = _check_extras(max_grad_norm, norm_type, weight_decay_mode, skip_nonfinite, default_mode)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=extras["weight_decay_mode"] != "l2", **extras)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("capturable", False)
            group.setdefault("decoupled_weight_decay", group["weight_decay_mode"] != "l2")

    def _init_group(self, group, pairs, gi, view=_real):
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        amsgrad = group["amsgrad"]
        for p, g in pairs:
            state = self.state[p]
            if len(state) == 0 or "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps.append(self._step_tensor(state, p))
            params.append(view(p))
            grads.append(view(g))
            for name, out in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)) + (
                    (("max_exp_avg_sq", max_sqs),) if amsgrad else ()):
                s = state[name]
                self._check_state(name, s, p, gi)
                out.append(view(s))
        return params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps

    def _update(self, group, lists, kw, gi):
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = lists
        beta1, beta2 = group["betas"]
        self._call("adam_", gi, params, grads, exp_avgs, exp_avg_sqs, max_sqs,
                   steps, kw["lr"], kw["lr_tensor"], _scalar(beta1, "beta1"),
                   _scalar(beta2, "beta2"), _scalar(group["eps"], "eps"), kw["weight_decay"],
                   kw["decay_mode"], kw["initial_lr"], bool(group["amsgrad"]), kw["maximize"],
                   kw["grad_norm"], kw["max_norm"], kw["grad_scale"], kw["found_inf"],
                   kw["skip_nonfinite"])


class Adam(_AdamBase):
    """torch.optim.Adam (L2 weight decay by default) with fused clipping."""

    _default_mode = "l2"


class AdamW(_AdamBase):
    """torch.optim.AdamW (decoupled weight decay by default) with fused clipping."""

    _default_mode = "decoupled"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, norm_type=2.0,
                 weight_decay_mode=None, skip_nonfinite=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=False, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, weight_decay_mode=weight_decay_mode,
                         skip_nonfinite=skip_nonfinite)


class SGD(_FusedOptimizer):
    """torch.optim.SGD with fused clipping and a choice of weight decay."""

    _default_mode = "l2"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, max_grad_norm=None, norm_type=2.0, weight_decay_mode=None,
                 skip_nonfinite=True):
        _check_lr(lr)
        if _scalar(momentum, "momentum") < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if _scalar(weight_decay, "weight_decay") < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (_scalar(momentum, "momentum") <= 0 or _scalar(dampening, "dampening") != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        extras = _check_extras(max_grad_norm, norm_type, weight_decay_mode, skip_nonfinite,
                               self._default_mode)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused, **extras)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _init_group(self, group, pairs, gi, view=_real):
        params, grads, bufs, is_new = [], [], [], []
        momentum = _scalar(group["momentum"], "momentum")
        for p, g in pairs:
            params.append(view(p))
            grads.append(view(g))
            if momentum == 0.0:
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            is_new.append(buf is None)
            if buf is None:
                # Zeros, not empty: if this first step is skipped on the device
                # (found_inf, non-finite norm) the next step decays a zero
                # buffer, which with dampening == 0 equals starting from g.
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_buffer"] = buf
            self._check_state("momentum_buffer", buf, p, gi)
            bufs.append(view(buf))
        return params, grads, bufs, is_new

    def _update(self, group, lists, kw, gi):
        params, grads, bufs, is_new = lists
        self._call("sgd_", gi, params, grads, bufs, is_new, kw["lr"],
                   kw["lr_tensor"], _scalar(group["momentum"], "momentum"),
                   _scalar(group["dampening"], "dampening"), bool(group["nesterov"]),
                   kw["weight_decay"], kw["decay_mode"], kw["initial_lr"], kw["maximize"],
                   kw["grad_norm"], kw["max_norm"], kw["grad_scale"], kw["found_inf"],
                   kw["skip_nonfinite"])
