"""Drop-in replacements for torch.optim.Adam, AdamW and SGD whose step is one
fused pass per (param group, device): global-norm clipping, weight decay and
the update, in the fused_wd kernels.

Extra keyword-only options (per param group, in `defaults`):
  max_grad_norm=None    clip the global gradient norm to this (None: no clip)
  norm_type=2.0         2.0 or inf
  weight_decay_mode     "l2" | "decoupled" | "independent" | "corrected" | "l1" |
                        "l1_proximal" | "scheduled" | "adaptive" (None: the class
                        default); "corrected" shrinks by wd*lr**2/initial_lr; "l1"
                        adds wd*sign(p) to the gradient; "l1_proximal"
                        soft-thresholds p by lr*wd after the update; "scheduled"
                        (SWD, Adam/AdamW) shrinks by lr*wd/(sqrt(mean v_hat)+eps);
                        "adaptive" (AWD) by lr*lambda_bar, lambda_bar smoothed
                        from wd*|g|/|p| (docs/weight-decay.md)
  cautious_weight_decay=False  shrink only where the update and the param agree
                        in sign (not with "l2", "l1", "l1_proximal";
                        docs/weight-decay.md)
  skip_nonfinite=True   skip the whole step when the global norm is not finite

Mixed precision (per param group; see the README's "Mixed precision"):
  master_weights=False  fp16/bf16 params get an fp32 master copy, state key
                        "master_param"; the kernel updates the master and
                        writes the rounded param in the same pass
  state_dtype=None      dtype of the moments / momentum buffer: None = like
                        torch (the param's dtype; fp32 with master weights),
                        or torch.float32 / torch.bfloat16 (math stays fp32)
  stochastic_rounding=False  bf16 params without master weights are rounded
                        stochastically (counter-based RNG keyed by sr_seed,
                        param index, step and element: bitwise reproducible)
  sr_seed=None          the seed (None: torch.initial_seed()); kept in the
                        param groups, so in the state_dict

Clipping does not rewrite p.grad: the clipped gradient only exists inside
the kernel. `last_grad_norm` holds the pre-clip global norm (a 0-dim tensor,
unscaled when a GradScaler drives the step).

Optimizer-level (not per group, not in the state_dict):
  norm_in_backward=False  gather each param's part of the global norm in a
                        hook as backward finishes its grad, so that a clipped
                        step makes one pass over memory; bitwise the same
                        result (see the README's "The norm in backward")
"""
import collections
import itertools
import math
import operator
import typing
import weakref

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

import dataclasses

from fused_wd import _clip_guard, _ext, _ops
from fused_wd import distributed as _dist
from fused_wd._norm_slots import NormSlots
from fused_wd._ops import AdamLists, SgdLists, split_by_master

DECAY_MODES = {"l2": 0, "decoupled": 1, "independent": 2, "corrected": 3, "l1": 4, "l1_proximal": 5,
               "scheduled": 1, "adaptive": 1}
# the modes that add their decay to the gradient (torch's decoupled_weight_decay=False)
_COUPLED_MODES = ("l2", "l1")
# the automatic modes (docs/weight-decay.md): decoupled decay whose strength
# auto_decay computes on the device each step (its mode number); AWD keeps
# its smoothed coefficient in the group under this key
_AUTO_MODES = {"scheduled": 0, "adaptive": 1}
AWD_STATE_KEY = "adaptive_decay"
# the modes that divide by the group's initial lr
_INITIAL_LR_MODES = ("independent", "corrected")
_EXTRA = ("max_grad_norm", "norm_type", "weight_decay_mode", "skip_nonfinite", "master_weights",
          "state_dtype", "stochastic_rounding", "sr_seed", "cautious_weight_decay")
_FALSE_EXTRAS = ("master_weights", "stochastic_rounding", "cautious_weight_decay")
_LOW = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float64) + _LOW
_STATE_DTYPES = (None, torch.float32, torch.bfloat16)
MASTER_KEY = "master_param"


# torch.optim's global step hooks (pre, post), None if this torch keeps them
# elsewhere (step then always takes torch's wrapper), and whether the
# autograd profiler records
_STEP_HOOKS = tuple(getattr(_torch_optimizer, name, None)
                    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))
_STEP_HOOKS = None if None in _STEP_HOOKS else _STEP_HOOKS
_profiler_enabled = torch._C._autograd._profiler_enabled


# Host copies of tensor hyperparameters: id -> (weak reference, version, value).
_HOST_VALUES = {}


def _scalar(x, name):
    """A hyperparameter that torch accepts as a float or a 1-element tensor.
    A tensor is read on the host once, and again only after an in-place
    change (its version counter moved): no device sync per step."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a float or a 1-element tensor, got shape {tuple(x.shape)}")
        key = id(x)
        hit = _HOST_VALUES.get(key)
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        value = float(x.item())
        _HOST_VALUES[key] = (weakref.ref(x, lambda _, k=key: _HOST_VALUES.pop(k, None)), x._version, value)
        return value
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


def _check_mixed(master_weights, state_dtype, stochastic_rounding, sr_seed):
    for name, v in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    if state_dtype not in _STATE_DTYPES:
        raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, got {state_dtype!r}")
    if sr_seed is None:
        # the default generator's seed: reproducible under torch.manual_seed,
        # and reading it draws nothing from the user's random stream
        sr_seed = torch.initial_seed() % (1 << 62)
    if not isinstance(sr_seed, int) or isinstance(sr_seed, bool) or not 0 <= sr_seed < (1 << 63):
        raise ValueError(f"sr_seed must be an int in [0, 2**63), got {sr_seed!r}")
    return dict(master_weights=master_weights, state_dtype=state_dtype,
                stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)


def _check_cautious(cautious, mode):
    """cautious_weight_decay as given, checked against the group's mode."""
    if not isinstance(cautious, bool):
        raise ValueError(f"cautious_weight_decay must be a bool, got {cautious!r}")
    if cautious and mode in _COUPLED_MODES:
        raise ValueError("cautious_weight_decay=True needs weight_decay_mode 'decoupled', 'independent', "
                         f"'corrected', 'scheduled' or 'adaptive': with {mode!r} the decay is part of the "
                         "gradient, so there is no separate shrink to mask")
    if cautious and mode == "l1_proximal":
        raise ValueError("cautious_weight_decay=True needs weight_decay_mode 'decoupled', 'independent', "
                         "'corrected', 'scheduled' or 'adaptive': 'l1_proximal' is a soft threshold after "
                         "the update, not a shrink to mask")
    return cautious


def _check_extras(max_grad_norm, norm_type, weight_decay_mode, skip_nonfinite, default_mode,
                  cautious_weight_decay=False):
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
                skip_nonfinite=skip_nonfinite,
                cautious_weight_decay=_check_cautious(cautious_weight_decay, mode))


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _local_real(t):
    """What the kernels get of a DTensor (FSDP2): its local shard, real."""
    return _real(_dist.local(t))


_is = operator.is_
_is_not = operator.is_not


_same_items = _ops.same_items
_dtype_of = operator.attrgetter("dtype")
_grad_of = operator.attrgetter("grad")
_layout_of = operator.attrgetter("layout")

# A C++ list (see _ops.CppList).
_CppList = _ops.CppList


def _pinned(lists):
    """The lists dataclass with each list of tensors, and of bools (SGD's
    buffer_is_new: converted element by element on every call otherwise,
    about 5% of an SGD call with 1,000 tensors), as a C++ list (see
    _CppList)."""
    if _CppList is None:
        return lists
    out = {}
    for f in dataclasses.fields(lists):
        xs = getattr(lists, f.name)
        if xs and (all(isinstance(x, torch.Tensor) for x in xs) or all(type(x) is bool for x in xs)):
            out[f.name] = _CppList(xs)
    return dataclasses.replace(lists, **out)


class _TrackedState(dict):
    """A param's state dict (self.state[p]) that counts its changes on its
    optimizer's epoch, so that a step proves in one comparison that no
    state entry was replaced, added or removed (the step plans). Pickles,
    copies and checkpoints as a plain dict."""

    __slots__ = ("_epoch",)

    def __init__(self, epoch, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch = epoch

    def _bump(self):
        self._epoch[0] += 1

    def __setitem__(self, key, value):
        self._bump()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._bump()
        super().__delitem__(key)

    def __ior__(self, other):
        self._bump()
        return super().__ior__(other)

    def clear(self):
        self._bump()
        super().clear()

    def pop(self, *args):
        self._bump()
        return super().pop(*args)

    def popitem(self):
        self._bump()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._bump()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        self._bump()
        super().update(*args, **kwargs)

    def copy(self):
        return dict(self)

    def __reduce__(self):
        return dict, (dict(self),)


class _StateMap(collections.defaultdict):
    """self.state of a fused_wd optimizer: torch's defaultdict of per-param
    dicts, whose changes (and those of its _TrackedState values) advance
    `epoch`. A plain dict stored as a value is kept as it is (the caller
    may hold it) and makes the map `untracked`: steps then check every
    state entry (see _Plans.states_hold). Pickles as torch's defaultdict."""

    __slots__ = ("epoch", "untracked")

    def __init__(self, items=()):
        super().__init__(None)
        self.epoch = [0]
        self.untracked = False
        for key, value in items:
            if type(value) in (dict, _TrackedState):
                value = _TrackedState(self.epoch, value)
            else:
                self.untracked = True
            dict.__setitem__(self, key, value)

    def __missing__(self, key):
        value = _TrackedState(self.epoch)
        self[key] = value
        return value

    def _own(self, value):
        if not (isinstance(value, _TrackedState) and value._epoch is self.epoch):
            self.untracked = True
        self.epoch[0] += 1
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, self._own(value))

    def __delitem__(self, key):
        self.epoch[0] += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self.untracked = True
        self.epoch[0] += 1
        return super().__ior__(other)

    def clear(self):
        self.epoch[0] += 1
        super().clear()

    def pop(self, *args):
        self.epoch[0] += 1
        return super().pop(*args)

    def popitem(self):
        self.epoch[0] += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def copy(self):
        return collections.defaultdict(dict, self)

    def __reduce__(self):
        return collections.defaultdict, (dict,), None, None, iter(self.items())


class _AllParams(typing.NamedTuple):
    """The params of every group's plan, in order, made once: as a Python
    list (the norm's) and as the ops take them, with their dtype codes
    (grads_ready's)."""
    plans: list
    params: list
    for_op: object
    codes: object


class _Plans(dict):
    """The step plans of an optimizer by param group index, made under one
    _plan_gen(), and the per-param state dicts (self.state's values, in
    order) they were made with: a state dict replaced or removed (or one
    added) shows there, one identity check per param for all plans."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen
        self.state_dicts = None
        self.epoch = None  # (the _StateMap's epoch, its value) after the last step
        self.same = False  # states_hold found nothing changed since the last step
        self.all_params = None  # _AllParams of the plans last accepted whole

    def own_grads(self, opt, n_groups):
        """The plans of every group (in order) when each holds and its
        params are the group's own params, all with a grad when it was made
        (then the ops may read each param's grad themselves, once
        grads_ready accepts them), else None."""
        plans = list(map(self.get, range(n_groups)))
        if not all(plan is not None and plan.mask is None and plan.holds(opt, group, self.same)
                   for plan, group in zip(plans, opt.param_groups)):
            return None
        kept = self.all_params
        if kept is None or not _same_items(plans, kept.plans):
            params = [p for plan in plans for p in plan.params]
            codes = [_ops.SCALAR_TYPE_CODES.get(d, -1) for plan in plans for d in plan.dtypes]
            if _CppList is not None:
                kept = _AllParams(plans, params, _CppList(params), _CppList(codes))
            else:
                kept = _AllParams(plans, params, params, codes)
            self.all_params = kept
        return plans if _ops.grads_ready(kept.for_op, kept.codes) else None

    def states_hold(self, state):
        """Whether the state dicts are those the plans were made with (then
        plan.holds checks their entries), and True for `same` when nothing
        in them changed at all since the last step (plan.holds then checks
        no entry): one comparison of a _StateMap's epoch."""
        self.same = self.unchanged(state)
        if self.same:
            return True
        dicts = list(state.values())
        return self.state_dicts is not None and _same_items(dicts, self.state_dicts)

    def unchanged(self, state):
        """Whether nothing in the state dicts changed since the last step
        (one comparison of a _StateMap's epoch)."""
        return isinstance(state, _StateMap) and not state.untracked \
            and self.epoch == (id(state.epoch), state.epoch[0])

    def stepped(self, state):
        """Records the state dicts after a step, for states_hold (nothing
        to record when nothing changed since the last step)."""
        epoch = (id(state.epoch), state.epoch[0]) if isinstance(state, _StateMap) else None
        if epoch is None or epoch != self.epoch or self.state_dicts is None:
            self.state_dicts = list(state.values())
        self.epoch = epoch


class _StepPlan:
    """What a param group's step needs besides its grads, validated once:
    the params that have grads, the op calls (per device, and per kind of
    param: without or with an fp32 master) with their param and state lists,
    and what it was built from. `grads` says whether it still holds."""

    def __init__(self, key):
        self.key = key
        self.devices = []
        # (device, indices into the grads or None for all, lists with grads None, sr): as they
        # are, the op reads each param's grad itself (grads_from_params)
        self.calls = []
        self.reusable = False
        self.grads_built = []

    def freeze(self, opt, group, params):
        """Records what the plan depends on, for `grads` to compare."""
        gp = group["params"]
        self.group_params, self.all_params = gp, list(gp)
        mask = [p.grad is not None for p in gp]
        self.mask = None if all(mask) else mask
        self.params = params
        self.dtypes = list(map(_dtype_of, params))
        self.st_dicts, self.st_keys, self.st_vals = [], [], []
        for p in params:
            d = opt.state[p]
            for k, v in d.items():
                self.st_dicts.append(d)
                self.st_keys.append(k)
                self.st_vals.append(v)

    def holds(self, opt, group, same=False):
        """Whether the plan holds apart from the grads: the group has the
        same params list with the same params in it, every entry of the
        params' state dicts is the same object (the dicts themselves:
        _Plans.states_hold; `same`: it found nothing changed, and no entry
        is looked at) and the options the lists depend on are unchanged.
        Identity checks in C loops (_same_items, map): no per-param Python
        frame."""
        if not self.same_params(group) or opt._plan_key(group) != self.key:
            return False
        if same:
            return True
        try:
            return all(map(_is, map(operator.getitem, self.st_dicts, self.st_keys), self.st_vals))
        except KeyError:
            return False

    def same_params(self, group):
        """Whether the group has the params list the plan was made with,
        holding the same params."""
        gp = group["params"]
        return gp is self.group_params and _same_items(gp, self.all_params)

    def grads(self, opt, group, same=False):
        """The group's grads (of the params that have one, in order) when
        the plan still holds (see holds), else None: and the same params
        have grads, every grad with the dtype its param had (the grad setter
        and autograd keep a grad's dtype, shape and device those of its
        param, so a param re-dtyped shows here). The ops check every tensor
        again (shape, dtype, device, layout) before they write anything."""
        if not self.holds(opt, group, same):
            return None
        gp = group["params"]
        grads = list(map(_grad_of, gp))
        if self.mask is None:
            if any(map(_is, grads, itertools.repeat(None))):
                return None
        else:
            if list(map(_is_not, grads, itertools.repeat(None))) != self.mask:
                return None
            grads = list(itertools.compress(grads, self.mask))
        if list(map(_dtype_of, grads)) != self.dtypes:
            return None
        return grads


# Group option values a steady step may keep as they were: immutable, so
# one identity check proves the value unchanged.
_IMMUTABLE = (type(None), bool, int, float, str, torch.dtype)


def _immutable(v):
    return type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))


class _Steady:
    """A step that repeats the last one but for the grads' values, lr and
    the norm: every plan held and the ops read each param's own grad (the
    _step path `own`), with no scaler, hooks, statistics or automatic decay.
    It keeps that step's op calls with their arguments in C++
    (torch.classes.fused_wd.KeptCall: no Python argument parsing), and
    repeats them while `holds`: the same plans, state dicts (one epoch
    comparison), param groups, params and option values (identity checks:
    only immutable values are kept; a float lr may change, and is passed as
    it is now), and the grads are what grads_ready accepts (checked by the
    first kept call itself when the step does not clip, by the grads_ready
    op before the norm when it does). Anything else goes the full way,
    which makes a new one."""

    def __init__(self, opt, plans, calls, clips):
        self.plans = plans
        self.groups = opt.param_groups
        self.plan_list = [plans[gi] for gi in range(len(opt.param_groups))]
        self.keys = [tuple(g) for g in opt.param_groups]
        self.values = [tuple(g.values()) for g in opt.param_groups]
        self.lr_at = [k.index("lr") for k in self.keys]
        self.default_lr = opt.defaults.get("lr")
        # (group index, its KeptCall's run, the device of the norm or None),
        # and each call's lr
        self.calls = calls
        self.lrs = [kept_lr for _, _, _, kept_lr in calls]
        self.clips = clips

    @staticmethod
    def make(opt, plans, calls, norm):
        """The steady step of the step that just made these calls, or None
        where one may not repeat it."""
        if not all(_immutable(v) for g in opt.param_groups for k, v in g.items() if k != "params"):
            return None
        clips = any(g["max_grad_norm"] is not None for g in opt.param_groups)
        if clips and norm is None:
            return None
        kept = []
        for i, (gi, lists, kw, device) in enumerate(calls):
            kw = dict(kw)
            kw.pop("grad_norm", None)
            call = _ops.kept_call(opt._op_name, opt._op_args(lists, **kw))
            if i == 0 and not clips:
                everyone = plans.all_params
                call.check_grads(list(everyone.for_op), list(everyone.codes))
            # the bound method, looked up once: a lookup per step costs
            # about 0.6 us and allocates
            kept.append((gi, call.run, device if "max_norm" in kw else None, float(kw["lr"])))
        return _Steady(opt, plans, kept, clips)

    def holds(self, opt):
        plans = self.plans
        if opt.__dict__.get("_plans") is not plans or plans.gen != opt._plan_gen() \
                or not plans.unchanged(opt.state) \
                or getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None \
                or opt._norm_slots.tracking \
                or opt.param_groups is not self.groups or len(self.groups) != len(self.keys) \
                or opt.defaults.get("lr") is not self.default_lr:
            return False
        for gi, (group, plan, keys, values) in enumerate(zip(self.groups, self.plan_list, self.keys,
                                                              self.values)):
            if not plan.same_params(group):
                return False
            if not _same_items(tuple(group), keys):
                return False
            now = tuple(group.values())
            if not _same_items(now, values) and not self._new_lr(gi, now):
                return False
        if not self.clips:
            return True  # the first kept call checks the grads
        kept = plans.all_params
        return torch.ops.fused_wd.grads_ready.default(kept.for_op, kept.codes)

    def _new_lr(self, gi, now):
        """Whether only the float lr of group gi changed: then its calls
        get it (and it is kept)."""
        at = self.lr_at[gi]
        lr = now[at]
        if type(lr) is not float and type(lr) is not int or any(
                a is not b for i, (a, b) in enumerate(zip(now, self.values[gi])) if i != at):
            return False
        for i, (gj, _, _, _) in enumerate(self.calls):
            if gj == gi:
                self.lrs[i] = float(lr)
        self.values[gi] = now
        return True

    def run(self, opt):
        """Runs the kept calls; False, with nothing written, when the first
        one finds the grads changed (only where holds left that to it)."""
        norm = None
        if self.clips:
            norm = opt._global_norm((), None, own_params=self.plans.all_params.params)
        for (gi, run, device, _), lr in zip(self.calls, self.lrs):
            grad_norm = None
            if device is not None:
                grad_norm = norm if norm.device == device else norm.to(device, non_blocking=True)
            try:
                ran = run(lr, grad_norm)
            except RuntimeError as e:
                raise opt._group_error(gi, e) from e
            if not ran:
                return False
        if norm is not None:
            opt._last_grad_norm[0] = norm
        opt._stepped[0] = True
        self.plans.stepped(opt.state)
        opt.__dict__["_steady_steps"] = opt.__dict__.get("_steady_steps", 0) + 1
        return True


class _FusedOptimizer(Optimizer):
    """What Adam, AdamW and SGD share: argument handling, state checks, the
    global norm and the per-(group, device) dispatch. Subclasses provide
    `_init_group` (state, lazily, with torch's keys; `view` maps each param,
    grad and state to what the kernels get), `_split_calls` (the op calls
    of a group's lists), `_op_hyper` (the op's own hyperparameters) and
    `_op`."""

    _step_supports_amp_scaling = True
    _default_mode = "l2"

    def __init__(self, params, defaults, norm_in_backward=False):
        if defaults.get("differentiable"):
            raise RuntimeError(f"fused_wd.{type(self).__name__} does not support differentiable=True")
        if not isinstance(norm_in_backward, bool):
            raise TypeError(f"norm_in_backward must be True or False, got {norm_in_backward!r}")
        self._norm_in_backward = norm_in_backward
        self._norm_slots = NormSlots(self, _local_real)
        super().__init__(params, defaults)
        self.state = _StateMap(self.state.items())
        # one-slot lists, written in place by step(): dynamo (torch 2.11)
        # refuses an attribute store on the optimizer inside a compiled step
        self._last_grad_norm = [None]
        self._stepped = [False]

    @property
    def last_grad_norm(self):
        """The pre-clip global norm of the last step that clipped (a 0-dim
        tensor, unscaled), or None."""
        box = self.__dict__.get("_last_grad_norm")
        return None if box is None else box[0]

    @property
    def last_weight_norm(self):
        """The global 2-norm of the optimizer's params (of their fp32
        masters where they have one) as the last step left them, a 0-dim
        tensor (float32, on the first param's device), or None before the
        first step. From the statistics the update pass writes as it goes:
        the first read, and params changed since by anything else, cost one
        read of those params; no host sync."""
        stepped = self.__dict__.get("_stepped")
        if not (stepped and stepped[0]):
            return None
        if any(_dist.is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise RuntimeError("last_weight_norm is not available with DTensor (FSDP2) params: it would "
                               "need a reduction across ranks")
        return self._norm_slots.weight_norm()

    @property
    def norm_in_backward(self):
        """Whether hooks gather the global norm's partials during backward."""
        return self.__dict__.get("_norm_in_backward", False)

    @property
    def norm_stats(self):
        """How many params' partials of the global norm came from backward
        hooks ("from_backward"), how many a step computed ("at_step": no
        hook ran, or the grad changed since; every part without
        norm_in_backward), and how many a step read for params too small
        for a hook ("small"); cumulative."""
        return dict(self._norm_slots.counts)

    def remove_norm_hooks(self):
        """Undo norm_in_backward=True: remove the hooks; steps then compute
        the whole norm themselves (same bits)."""
        self._norm_slots.remove()
        self._norm_in_backward = False

    def _clip_norm_type(self):
        """The norm_type of the groups that clip (None: no group clips, or
        they disagree, which step() reports)."""
        types = {g["norm_type"] for g in self.param_groups if g["max_grad_norm"] is not None}
        return types.pop() if len(types) == 1 else None

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.state, _StateMap):  # load_state_dict, unpickling
            self.state = _StateMap(self.state.items())
        self._invalidate_plans()
        self.__dict__.setdefault("_last_grad_norm", [self.__dict__.pop("last_grad_norm", None)])
        self.__dict__.setdefault("_stepped", [False])
        self.__dict__.setdefault("_norm_in_backward", False)
        if "_norm_slots" not in self.__dict__:
            self._norm_slots = NormSlots(self, _local_real)
        for group in self.param_groups:
            for key in _EXTRA:
                group.setdefault(key, self.defaults.get(key, False if key in _FALSE_EXTRAS else None))
            if group["sr_seed"] is None:
                group["sr_seed"] = torch.initial_seed() % (1 << 62)
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
        cautious = param_group.get("cautious_weight_decay", self.defaults.get("cautious_weight_decay", False))
        _check_cautious(cautious, mode if mode is not None else self._default_mode)
        mixed = {k: param_group.get(k, self.defaults.get(k)) for k in
                 ("master_weights", "state_dtype", "stochastic_rounding", "sr_seed")}
        param_group.update(_check_mixed(**mixed))
        self._param_ids = None
        self._invalidate_plans()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._norm_slots.invalidate()
        if self._norm_in_backward:
            self._norm_slots.register(group["params"])
        if group["weight_decay_mode"] == "scheduled" and (not isinstance(self, _AdamBase) or group["amsgrad"]):
            raise ValueError("weight_decay_mode='scheduled' (SWD) needs Adam or AdamW without amsgrad: it "
                             "scales the decay by the mean of exp_avg_sq, and amsgrad's maximum of it "
                             "has no running sum the pass could keep")
        if group["weight_decay_mode"] in _INITIAL_LR_MODES:
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
            if _scalar(group["initial_lr"], "initial_lr") == 0.0:
                raise ValueError(f"weight_decay_mode={group['weight_decay_mode']!r} divides by the "
                                 "initial lr, which is 0 here; give a nonzero lr")
        if group["max_grad_norm"] is not None:
            _clip_guard.mark(self, group["params"])

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
            if _real(p).dtype not in _KERNEL_DTYPES:
                raise RuntimeError(
                    f"fused_wd.{type(self).__name__}: param group {gi}: a parameter of shape "
                    f"{tuple(p.shape)} has dtype {p.dtype}; the kernels take float32, float64, "
                    "float16, bfloat16 (and complex views of them)")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(
                    f"fused_wd.{type(self).__name__}: param group {gi}: a parameter of shape "
                    f"{tuple(p.shape)} and dtype {p.dtype} has a grad of shape {tuple(g.shape)} "
                    f"and dtype {g.dtype}")
            out.append((p, g))
        return out

    def _step_tensor(self, group, state, p):
        """torch's 0-dim float32 `step`, kept on the param's device; float64
        for a param rounded stochastically, whose rounding key must keep
        advancing past 2^24 steps (where float32 + 1 stops counting)."""
        dtype = torch.float64 if self._rounds_stochastically(group, p) else torch.float32
        step = state.get("step")
        if step is None:
            step = torch.zeros((), dtype=dtype, device=p.device)
        elif not isinstance(step, torch.Tensor):
            step = torch.tensor(float(step), dtype=dtype, device=p.device)
        elif step.device != p.device or step.dtype != dtype or step.dim() != 0:
            step = step.to(device=p.device, dtype=dtype).reshape(())
        state["step"] = step
        return step

    @staticmethod
    def _check_state(name, s, p, gi, dtype=None):
        dtype = p.dtype if dtype is None else dtype
        if s.shape != p.shape or s.dtype != dtype or s.device != p.device:
            raise RuntimeError(
                f"param group {gi}: optimizer state '{name}' has shape {tuple(s.shape)}, dtype "
                f"{s.dtype}, device {s.device}, but its parameter has shape {tuple(p.shape)}, dtype "
                f"{p.dtype}, device {p.device} (the parameter changed after its state was created, "
                "or a checkpoint of another model was loaded)")

    # ------------------------------------------------------- mixed precision

    @staticmethod
    def _uses_master(group, p):
        return bool(group["master_weights"]) and p.dtype in _LOW

    def _state_dtype(self, group, p):
        """The dtype of p's moments / momentum buffer."""
        if p.dtype not in _LOW + (torch.float32,):
            return p.dtype  # fp64 and complex params keep torch's layout
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float32 if self._uses_master(group, p) else p.dtype

    def _state_like(self, group, state, name, p):
        """state[name], created as zeros or converted to the dtype the group
        wants (e.g. bf16 moments of a torch checkpoint, loaded with
        master_weights=True, become fp32)."""
        want = self._state_dtype(group, p)
        s = state.get(name)
        if s is None:
            s = torch.zeros_like(p, dtype=want, memory_format=torch.preserve_format)
            state[name] = s
        elif s.dtype != want and s.dtype == p.dtype and s.shape == p.shape:
            # torch's layout (the param's dtype), the group wants another
            s = s.to(dtype=want)
            state[name] = s
        return s

    def _master(self, group, state, p):
        """The fp32 master copy of p (None when p has none); a missing one (a
        fresh state, or a torch.optim checkpoint) is initialized from p."""
        if not self._uses_master(group, p):
            return None
        mp = state.get(MASTER_KEY)
        if mp is None or mp.dtype != torch.float32:
            src = p if mp is None else mp
            mp = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            mp.copy_(src)
            state[MASTER_KEY] = mp
        self._check_state(MASTER_KEY, mp, p, None, torch.float32)
        return mp

    def _rounds_stochastically(self, group, p):
        return bool(group["stochastic_rounding"]) and p.dtype == torch.bfloat16 \
            and not self._uses_master(group, p)

    def _sr_id(self, p):
        """The index of p in the optimizer (state_dict order): the param part
        of the stochastic-rounding key."""
        ids = getattr(self, "_param_ids", None)
        if ids is None:
            ids = {}
            for group in self.param_groups:
                for q in group["params"]:
                    ids.setdefault(id(q), len(ids))
            self._param_ids = ids
        return ids[id(p)]

    def state_dict(self):
        """torch.optim's, with each param's state a plain dict (holding the
        optimizer's own tensors): a checkpoint names no fused_wd class, and
        torch.load(weights_only=True) reads it."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, _TrackedState) else v for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        """torch.optim's, except that floating state keeps the dtype it was
        saved with (torch casts it to the param's dtype, which would round
        an fp32 master or fp32 moments of a bf16 param); `_init_group` then
        converts to the dtype each group wants."""
        self._invalidate_plans()
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for idx, (p, group) in zip(saved_ids, params):
            st, cur = saved.get(idx), self.state.get(p)
            if not st or cur is None:
                continue
            for k, v in st.items():
                if k == "step" or not isinstance(v, torch.Tensor) or not v.is_floating_point():
                    continue
                want = torch.float32 if k == MASTER_KEY else self._state_dtype(group, p)
                c = cur.get(k)
                if isinstance(c, torch.Tensor) and c.dtype != v.dtype and v.dtype == want:
                    cur[k] = v.to(device=c.device, copy=True)
        self._param_ids = None
        for group in self.param_groups:
            if group["max_grad_norm"] is not None:
                _clip_guard.mark(self, group["params"])

    def _global_norm(self, per_group, grad_scale, sharded=False, own_params=None):
        """The pre-clip global norm over the grads of every group, unscaled;
        across ranks when `sharded` (DTensors: one local pass, one all-reduce).
        `per_group` as step() holds it: per group (plan, grads) or (None,
        (param, grad) pairs). Each param's part of the norm comes from its
        slot (fused_wd/_norm_slots.py). own_params: every group reads its
        params' own grads (step's own_grads), and these are the params of
        all groups in one list, made once (_Plans.all_params)."""
        clipping = [g for g in self.param_groups if g["max_grad_norm"] is not None]
        if not clipping:
            return None
        norm_types = {g["norm_type"] for g in clipping}
        if len(norm_types) > 1:
            raise ValueError(f"param groups that clip must share one norm_type, got {sorted(norm_types)}")
        norm_type = norm_types.pop()
        if own_params is not None:
            params, grads, per_group = own_params, None, ()
        else:
            params, grads = [], []
        for plan, xs in per_group:
            if plan is not None:  # a plan's params are real (_build_plan), and so their grads
                params.extend(plan.params)
                grads.extend(xs)
            else:
                params.extend(p for p, _ in xs)
                grads.extend(g if sharded else _real(g) for _, g in xs)
        if grads is not None and not grads or not params:
            return None
        if sharded:
            norm = _dist.global_norm(grads, norm_type,
                                     lambda entries, nt: self._norm_slots.norm(params, entries, nt),
                                     _real)
        else:
            norm = self._norm_slots.norm(params, grads, norm_type)
        if grad_scale is not None:
            norm = norm / grad_scale.to(norm.device, non_blocking=True).reshape(())
        return norm

    def step(self, closure=None):
        """One optimizer step; `closure` (re)computes the loss under autograd."""
        if _STEP_HOOKS is None or _STEP_HOOKS[0] or _STEP_HOOKS[1] or self._optimizer_step_pre_hooks \
                or self._optimizer_step_post_hooks or _profiler_enabled() or torch.compiler.is_compiling():
            return self._wrapped_step() if closure is None else self._wrapped_step(closure)
        # torch.optim's step wrapper (record_function, the hooks) and no_grad
        # cost about 30 us per step; with no hook, no profiler and no
        # compiler they would do nothing but set the grad mode
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._step(closure, compiling=False)
        finally:
            torch._C._set_grad_enabled(enabled)

    # torch.optim wraps a class's step once (Optimizer._patch_step_function)
    # unless it is marked hooked: step above is its own wrapper
    step.hooked = True

    def _step(self, closure=None, compiling=None):
        _ext.require()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # dynamo traces the plain path: a compiled step builds no plan.
        reuse = not (torch.compiler.is_compiling() if compiling is None else compiling)
        steady = self.__dict__.pop("_steady", None) if reuse else None
        if steady is not None and steady.holds(self) and steady.run(self):
            self.__dict__["_steady"] = steady
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Per group: (plan, its grads) when the group's step plan still holds
        # (see _StepPlan), else (None, (param, grad) pairs, checked).
        plans = self.__dict__.get("_plans") if reuse else None
        if plans is not None and (plans.gen != self._plan_gen() or not plans.states_hold(self.state)):
            plans = None
        auto_groups = [gi for gi, g in enumerate(self.param_groups) if g["weight_decay_mode"] in _AUTO_MODES]
        # Every group's plan holds and the ops may read each param's grad
        # themselves (grads None): no grad is touched in Python. Not with
        # the automatic decay modes, which look at the grads. (Norm hooks'
        # parts are proven against the grads in C loops: NormSlots.norm.)
        own = None
        if plans is not None and not auto_groups:
            own = plans.own_grads(self, len(self.param_groups))
        if own is not None:
            per_group = [(plan, None) for plan in own]
        else:
            per_group = []
            for gi, group in enumerate(self.param_groups):
                plan = plans.get(gi) if plans is not None else None
                grads = plan.grads(self, group, plans.same) if plan is not None else None
                per_group.append((plan, grads) if grads is not None else (None, self._grads_of(group, gi)))
        # A sparse grad (which no grad setter refuses) is refused by the op
        # that gets it, before it writes; with more than one op call, or a
        # norm over every grad first, it is refused here, before anything
        # runs, with _grads_of's message (with `own`, grads_ready refused
        # every sparse grad already).
        if own is None and (len(per_group) > 1 or any(plan is not None and len(plan.calls) > 1
                                                      for plan, _ in per_group)
                            or any(group["max_grad_norm"] is not None for group in self.param_groups)):
            for gi, (group, (plan, xs)) in enumerate(zip(self.param_groups, per_group)):
                if plan is not None and xs is not None and any(map(_is_not, map(_layout_of, xs),
                                                itertools.repeat(torch.strided))):
                    self._grads_of(group, gi)
        # DTensor params (FSDP2): the kernels get local shards, and no plan
        # is used. A plan holds only when its params are those it was built
        # with, which were no DTensors (a sharded step keeps no plan): only
        # the groups without one are looked at, one isinstance per param,
        # and none when every group's plan holds (own).
        sharded = own is None and _dist.refresh() and _dist.any_dtensor(
            p for plan, xs in per_group if plan is None for p, _ in xs)
        if sharded:
            per_group = [(None, self._grads_of(group, gi)) if plan is not None else (plan, xs)
                         for gi, (group, (plan, xs)) in enumerate(zip(self.param_groups, per_group))]
        if auto_groups and sharded:
            raise RuntimeError("weight_decay_mode 'scheduled' and 'adaptive' are not available with DTensor "
                               "(FSDP2) params: their statistics would need a reduction across ranks")
        norm = self._global_norm(per_group, grad_scale, sharded,
                                 own_params=plans.all_params.params if own is not None else None)
        if norm is not None:
            self._last_grad_norm[0] = norm
        slots = self._norm_slots
        track = slots.tracking or bool(auto_groups)
        # Every group's lists and arguments are built and checked before the
        # first kernel runs: a step that raises changes nothing.
        calls = []
        for gi, (group, (plan, xs)) in enumerate(zip(self.param_groups, per_group)):
            if plan is None:
                plan = self._build_plan(group, gi, xs, sharded, keep=reuse)
                if plan.reusable:
                    if plans is None:
                        plans = self.__dict__["_plans"] = _Plans(self._plan_gen())
                    plans[gi] = plan
                elif plans is not None:
                    plans.pop(gi, None)
                xs, plan.grads_built = plan.grads_built, None  # a kept plan holds no grads
            kws = {device: self._common_kwargs(group, device, norm, grad_scale, found_inf)
                   for device in plan.devices}
            hyper = self._op_hyper(group)
            for device, idx, sub, sr in plan.calls:
                kw = dict(hyper, **kws[device])
                if sr:
                    kw["stochastic_rounding"] = True
                if track:
                    ps = plan.params if idx is None else list(map(plan.params.__getitem__, idx))
                    kw["stats"], kw["stat_slots"] = slots.stat_args(ps, device)
                if xs is None:  # the ops read the params' own grads
                    calls.append((gi, sub, kw, device))
                else:
                    grads = xs if idx is None else list(map(xs.__getitem__, idx))
                    calls.append((gi, dataclasses.replace(sub, grads=grads), kw, device))
        # the automatic decays' strengths, from the statistics as the last
        # pass left them (AWD's smoothed coefficient is committed only once
        # every op call succeeded)
        commit = []
        if auto_groups:
            strengths = self._auto_decays(auto_groups, per_group, norm, grad_scale, found_inf, commit)
            for gi, _, kw, _ in calls:
                if gi in strengths:
                    device = kw["stats"].device
                    kw["wd_tensor"] = strengths[gi].to(device, non_blocking=True)
        for gi, lists, kw, _ in calls:
            self._call(self._op, gi, lists, **kw)
        for dst, src in commit:
            dst.copy_(src)
        self._stepped[0] = True
        if plans is not None:
            plans.stepped(self.state)
            if own is not None and not track and not auto_groups and grad_scale is None and found_inf is None:
                steady = _Steady.make(self, plans, calls, norm)
                if steady is not None:
                    self.__dict__["_steady"] = steady
        return loss

    # step as torch.optim runs it: in torch's wrapper (the profiler's
    # record_function, the global and the optimizer's step hooks), no_grad
    _wrapped_step = Optimizer.profile_hook_step(torch.no_grad()(_step))

    # ------------------------------------------------ automatic weight decay

    def _counters(self, params, device):
        """The params' step counters before this step (0 without state), as
        one float64 tensor on `device`."""
        steps = [None if d is None else d.get("step") for d in map(self.state.get, params)]
        try:
            return torch.stack(steps).to(device, torch.float64).reshape(-1)
        except (TypeError, RuntimeError):  # a param without a counter yet, or counters of several kinds
            pass
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([zero if t is None else torch.as_tensor(t).to(device, torch.float64).reshape(())
                            for t in steps])

    def _auto_decays(self, auto_groups, per_group, norm, grad_scale, found_inf, commit):
        """{group index: the decay strength of its automatic mode this step}
        (a float64 0-dim tensor on the device, no host sync), from the rows
        of the pass's statistics (made current first) and each grad's sum of
        squares (the 2-norm's partials: taken from this step's norm when it
        was one, else read now). The statistics of a mode are global over
        the params this step updates in every group of that mode."""
        slots = self._norm_slots
        out = {}
        for mode, kind in _AUTO_MODES.items():
            gis = [gi for gi in auto_groups if self.param_groups[gi]["weight_decay_mode"] == mode]
            pairs = []
            for gi in gis:
                plan, xs = per_group[gi]
                pairs.extend(zip(plan.params, xs) if plan is not None else xs)
            if not pairs:
                continue
            groups = [self.param_groups[gi] for gi in gis]
            clips = {g["max_grad_norm"] for g in groups}
            if kind == _AUTO_MODES["scheduled"]:
                betas2 = {_scalar(g["betas"][1], "beta2") for g in groups}
                if len(betas2) > 1 or len(clips) > 1:
                    raise ValueError("param groups with weight_decay_mode='scheduled' share one mean of "
                                     "exp_avg_sq, so they must share betas[1] and max_grad_norm; got "
                                     f"betas[1] {sorted(betas2)} and max_grad_norm {sorted(clips, key=str)}")
            sel = slots.select(mode, [p for p, _ in pairs])
            params = sel.params
            slots.make_current(params, (1,) if kind == _AUTO_MODES["scheduled"] else (0,), sel.snaps)
            stats = slots.gather(sel, slots.stats_buffer)
            device = sel.device
            from_norm = norm is not None and self._clip_norm_type() == 2.0
            gsq = slots.grad_sumsq(sel, None if from_norm else sel.ordered([g for _, g in pairs]), from_norm)
            steps = self._counters(params, device) if kind == _AUTO_MODES["scheduled"] \
                else torch.zeros(len(params), dtype=torch.float64, device=device)
            numels = sel.numels
            for gi, group in zip(gis, groups):
                clip = group["max_grad_norm"] is not None and norm is not None
                state = torch.zeros(1, dtype=torch.float64, device=device)
                if kind == _AUTO_MODES["adaptive"]:
                    kept = group.get(AWD_STATE_KEY)
                    if not isinstance(kept, torch.Tensor) or kept.device != device \
                            or kept.dtype != torch.float64 or kept.numel() != 1:
                        kept = torch.zeros(1, dtype=torch.float64, device=device) if kept is None else \
                            torch.as_tensor(kept).to(device=device, dtype=torch.float64).reshape(1)
                        group[AWD_STATE_KEY] = kept
                    state = kept.to(device=device, dtype=torch.float64, copy=True).reshape(1)
                    commit.append((kept, state))
                beta2 = _scalar(group["betas"][1], "beta2") if "betas" in group else 0.0
                eps = _scalar(group["eps"], "eps") if "eps" in group else 0.0
                out[gi] = _ops.auto_decay(
                    stats, gsq, steps, numels, state, mode=kind,
                    weight_decay=_scalar(group["weight_decay"], "weight_decay"), beta2=beta2, eps=eps,
                    grad_norm=norm.to(device, non_blocking=True) if clip else None,
                    max_norm=float(group["max_grad_norm"]) if clip else 0.0,
                    grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                    found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
                    skip_nonfinite=bool(group["skip_nonfinite"]))
        return out

    # ------------------------------------------------------- the step plan
    #
    # With thousands of tensors the Python bookkeeping of a step rivals the
    # kernels, so each param group keeps a _StepPlan: its validated params,
    # state tensors and op lists, split by device and by master weights.
    # A step reuses it while nothing it depends on changed; see
    # _StepPlan.grads for what is checked each step (identities and cheap
    # attribute reads, in C loops) and _plan_gen for what rebuilds every
    # plan at once.

    def _plan_gen(self):
        """What every plan depends on as a whole: bumped by add_param_group,
        load_state_dict and __setstate__; the state mapping itself; and the
        DTensor class (resolved once torch.distributed.tensor is imported)."""
        return (self.__dict__.get("_plan_generation", 0), id(self.state), _dist.DTensor)

    def _invalidate_plans(self):
        self.__dict__["_plan_generation"] = self.__dict__.get("_plan_generation", 0) + 1
        self.__dict__.pop("_plans", None)
        self.__dict__.pop("_steady", None)

    def _plan_key(self, group):
        """The group options the plan's lists depend on."""
        return (group.get("amsgrad"), group.get("master_weights"), group.get("stochastic_rounding"),
                group.get("state_dtype"), _scalar(group.get("momentum", 0), "momentum") != 0,
                group.get("capturable"), isinstance(group["lr"], torch.Tensor))

    def _lists_reusable(self, lists):
        return True

    def _build_plan(self, group, gi, pairs, sharded, keep):
        """The plan of a group from its checked (param, grad) pairs: creates
        state lazily and checks it (_init_group), per device. `keep`: made to
        be reused (plan.reusable says whether it can be)."""
        if keep:
            self.__dict__["_plan_builds"] = self.__dict__.get("_plan_builds", 0) + 1
        plan = _StepPlan(self._plan_key(group) if keep else None)
        plan.grads_built = [_local_real(g) if sharded else _real(g) for _, g in pairs]
        plan.params = [p for p, _ in pairs]
        reusable = keep and not sharded
        pos = {}
        for i, (p, _) in enumerate(pairs):
            pos.setdefault(p.device, []).append(i)
        for device, idx in pos.items():
            dev_pairs = [pairs[i] for i in idx]
            if sharded:
                _dist.check_layouts(type(self).__name__, dev_pairs, self.state, gi)
                lists = self._init_group(group, dev_pairs, gi, _local_real)
            else:
                lists = self._init_group(group, dev_pairs, gi)
            reusable = reusable and self._lists_reusable(lists)
            plan.devices.append(device)
            for sub_idx, sub, sr in self._split_calls(group, lists):
                full = [idx[j] for j in sub_idx]
                plan.calls.append((device, None if len(full) == len(pairs) else full,
                                   dataclasses.replace(sub, grads=None), sr))
        params = [p for p, _ in pairs]
        plan.reusable = reusable and not any(p.is_complex() for p in params)
        if plan.reusable:
            plan.freeze(self, group, params)
            plan.calls = [(device, idx, _pinned(sub), sr) for device, idx, sub, sr in plan.calls]
        return plan

    def _common_kwargs(self, group, device, norm, grad_scale, found_inf):
        """The update ops' arguments from the group's options and this step's
        norm and scaler tensors, except the op's own (_op_hyper): only those
        that differ from the schema's defaults (csrc/schema.h), since every
        keyword costs the call."""
        def on_device(t):
            return t if t.device == device else t.to(device, non_blocking=True)

        lr = group["lr"]
        mode = group["weight_decay_mode"]
        kw = dict(weight_decay=_scalar(group["weight_decay"], "weight_decay"), decay_mode=DECAY_MODES[mode])
        if isinstance(lr, torch.Tensor):
            kw["lr_tensor"] = lr if lr.device == device or lr.device.type == "cpu" else lr.to(device)
            lr = 0.0
        kw["lr"] = float(lr)
        if _check_cautious(group["cautious_weight_decay"], mode):
            kw["cautious_wd"] = True
        if mode in _INITIAL_LR_MODES:
            # read by the kernels in "independent" and "corrected" modes only;
            # a tensor initial_lr (set by a scheduler for a tensor lr) is read
            # on the host once (see _scalar)
            initial_lr = _scalar(group.get("initial_lr", self.defaults["lr"]), "initial_lr")
            if initial_lr == 0.0:
                raise ValueError(f"weight_decay_mode={mode!r} needs a nonzero initial_lr")
            kw["initial_lr"] = initial_lr
        if group["maximize"]:
            kw["maximize"] = True
        if group["max_grad_norm"] is not None and norm is not None:
            kw["grad_norm"] = on_device(norm)
            kw["max_norm"] = float(group["max_grad_norm"])
        if grad_scale is not None:
            kw["grad_scale"] = on_device(grad_scale)
        if found_inf is not None:
            kw["found_inf"] = on_device(found_inf)
        if not group["skip_nonfinite"]:
            kw["skip_nonfinite"] = False
        return kw

    # the lists an op call gets only when it rounds stochastically
    _sr_lists = ()

    def _split_calls(self, group, lists):
        """[(indices, lists, stochastic_rounding)]: one op call per kind of
        param (without, with an fp32 master)."""
        out = []
        for idx, master in split_by_master(lists.master_params):
            sub = lists.select(idx)
            sr = bool(group["stochastic_rounding"]) and not master
            unused = {name: [] for name in self._sr_lists if not sr}
            if not master:
                unused["master_params"] = []
            out.append((idx, dataclasses.replace(sub, **unused), sr))
        return out

    def _call(self, op, gi, lists, **hyper):
        try:
            op(lists, **hyper)
        except RuntimeError as e:
            raise self._group_error(gi, e) from e

    def _group_error(self, gi, e):
        return RuntimeError(f"fused_wd.{type(self).__name__}, param group {gi}: {e}")


class _AdamBase(_FusedOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, norm_type=2.0, weight_decay_mode=None, skip_nonfinite=True,
                 master_weights=False, state_dtype=None, stochastic_rounding=False, sr_seed=None,
                 cautious_weight_decay=False, norm_in_backward=False):
        _check_lr(lr)
        if not 0.0 <= _scalar(eps, "eps"):
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= _scalar(betas[i], f"betas[{i}]") < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= _scalar(weight_decay, "weight_decay"):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        default_mode = "decoupled" if decoupled_weight_decay else self._default_mode
        if decoupled_weight_decay and weight_decay_mode not in (None, "decoupled", *_INITIAL_LR_MODES,
                                                                *_AUTO_MODES):
            raise ValueError("decoupled_weight_decay=True contradicts weight_decay_mode="
                             f"{weight_decay_mode!r}")
        extras = _check_extras(max_grad_norm, norm_type, weight_decay_mode, skip_nonfinite, default_mode,
                               cautious_weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=extras["weight_decay_mode"] not in _COUPLED_MODES, **extras,
                        **_check_mixed(master_weights, state_dtype, stochastic_rounding, sr_seed))
        super().__init__(params, defaults, norm_in_backward)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("capturable", False)
            group.setdefault("decoupled_weight_decay", group["weight_decay_mode"] not in _COUPLED_MODES)

    def _init_group(self, group, pairs, gi, view=_real):
        """The AdamLists of (param, grad) pairs, creating state lazily."""
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        masters, sr_ids = [], []
        amsgrad = group["amsgrad"]
        for p, g in pairs:
            state = self.state[p]
            if len(state) == 0 or "exp_avg" not in state:
                state.pop("step", None)
            names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
            for name in names:
                self._state_like(group, state, name, p)
            steps.append(self._step_tensor(group, state, p))
            params.append(view(p))
            grads.append(view(g))
            mp = self._master(group, state, p)
            masters.append(None if mp is None else view(mp))
            sr_ids.append(self._sr_id(p) if group["stochastic_rounding"] else 0)
            want = self._state_dtype(group, p)
            for name, out in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)) + (
                    (("max_exp_avg_sq", max_sqs),) if amsgrad else ()):
                s = state[name]
                self._check_state(name, s, p, gi, want)
                out.append(view(s))
        return AdamLists(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                         max_exp_avg_sqs=max_sqs, state_steps=steps, master_params=masters,
                         sr_ids=sr_ids)

    _op = staticmethod(_ops.adam_)
    _op_args = staticmethod(_ops.adam_args)
    _op_name = "adam_"

    _sr_lists = ("sr_ids",)

    def _op_hyper(self, group):
        beta1, beta2 = group["betas"]
        kw = dict(beta1=_scalar(beta1, "beta1"), beta2=_scalar(beta2, "beta2"), eps=_scalar(group["eps"], "eps"))
        if group["amsgrad"]:
            kw["amsgrad"] = True
        if group["stochastic_rounding"]:
            kw["sr_seed"] = int(group["sr_seed"])
        return kw


class Adam(_AdamBase):
    """torch.optim.Adam (L2 weight decay by default) with fused clipping."""

    _default_mode = "l2"


class AdamW(_AdamBase):
    """torch.optim.AdamW (decoupled weight decay by default) with fused clipping."""

    _default_mode = "decoupled"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, norm_type=2.0,
                 weight_decay_mode=None, skip_nonfinite=True, master_weights=False,
                 state_dtype=None, stochastic_rounding=False, sr_seed=None,
                 cautious_weight_decay=False, norm_in_backward=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=False, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, weight_decay_mode=weight_decay_mode,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                         sr_seed=sr_seed, cautious_weight_decay=cautious_weight_decay,
                         norm_in_backward=norm_in_backward)


class SGD(_FusedOptimizer):
    """torch.optim.SGD with fused clipping and a choice of weight decay."""

    _default_mode = "l2"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, max_grad_norm=None, norm_type=2.0, weight_decay_mode=None,
                 skip_nonfinite=True, master_weights=False, state_dtype=None,
                 stochastic_rounding=False, sr_seed=None, cautious_weight_decay=False,
                 norm_in_backward=False):
        _check_lr(lr)
        if _scalar(momentum, "momentum") < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if _scalar(weight_decay, "weight_decay") < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (_scalar(momentum, "momentum") <= 0 or _scalar(dampening, "dampening") != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        extras = _check_extras(max_grad_norm, norm_type, weight_decay_mode, skip_nonfinite,
                               self._default_mode, cautious_weight_decay)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused, **extras,
                        **_check_mixed(master_weights, state_dtype, stochastic_rounding, sr_seed))
        super().__init__(params, defaults, norm_in_backward)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _init_group(self, group, pairs, gi, view=_real):
        """The SgdLists of (param, grad) pairs, creating state lazily; with
        stochastic rounding each param has a `step` counter (the step of the
        rounding's key)."""
        params, grads, bufs, is_new, masters, sr_ids, steps = [], [], [], [], [], [], []
        momentum = _scalar(group["momentum"], "momentum")
        sr = bool(group["stochastic_rounding"])
        for p, g in pairs:
            params.append(view(p))
            grads.append(view(g))
            state = self.state[p]
            mp = self._master(group, state, p)
            masters.append(None if mp is None else view(mp))
            if sr:
                sr_ids.append(self._sr_id(p))
                steps.append(self._step_tensor(group, state, p))
            if momentum == 0.0:
                continue
            buf = state.get("momentum_buffer")
            is_new.append(buf is None)
            # Zeros, not empty: if this first step is skipped on the device
            # (found_inf, non-finite norm) the next step decays a zero
            # buffer, which with dampening == 0 equals starting from g.
            buf = self._state_like(group, state, "momentum_buffer", p)
            self._check_state("momentum_buffer", buf, p, gi, self._state_dtype(group, p))
            bufs.append(view(buf))
        return SgdLists(params=params, grads=grads, momentum_buffers=bufs, buffer_is_new=is_new,
                        master_params=masters, state_steps=steps, sr_ids=sr_ids)

    def _lists_reusable(self, lists):
        return not any(lists.buffer_is_new)  # a new buffer is set to g, once

    _op = staticmethod(_ops.sgd_)
    _op_args = staticmethod(_ops.sgd_args)
    _op_name = "sgd_"

    _sr_lists = ("state_steps", "sr_ids")  # the step counters serve only the rounding's key

    def _op_hyper(self, group):
        kw = dict(momentum=_scalar(group["momentum"], "momentum"),
                  dampening=_scalar(group["dampening"], "dampening"), nesterov=bool(group["nesterov"]))
        if group["stochastic_rounding"]:
            kw["sr_seed"] = int(group["sr_seed"])
        return kw
