"""A once-per-process warning when gradients are clipped twice.

When a fused_wd optimizer clips (`max_grad_norm=...`) and the training loop
or its framework also calls `torch.nn.utils.clip_grad_norm_` on the same
parameters (HF Trainer's default `max_grad_norm=1.0`, Lightning's
`gradient_clip_val`, Accelerate's `clip_grad_norm_`), the gradients are
clipped twice. The result is the same to about 1e-6 relative when both use
the same max norm (the second clip finds a norm already at the limit), but
the framework's clip costs two extra passes over the gradients, and a
smaller framework limit silently wins.

How it is detected, cheaply and without a host sync: the first time an
optimizer with clipping is built, `torch.nn.utils.clip_grad_norm_` is
wrapped. The wrapper looks each parameter it gets up in a dict of the
parameters that fused_wd clips (by id, checked with a weak reference: an
O(1) lookup per parameter, no tensor is read) and warns on the first hit of
a finite max norm; after that it only forwards. Limits: code that bound the
function before the wrapper was installed (`from torch.nn.utils import
clip_grad_norm_` at import time) is not seen, nor is a group whose
`max_grad_norm` is switched on after construction. `FUSED_WD_CLIP_GUARD=0`
turns the wrapper off.
"""
import math
import os
import warnings
import weakref

import torch

# id(param) -> (weakref to the param, weakref to the optimizer that clips it)
_clipped = {}
_state = {"warned": False}


def enabled():
    return os.environ.get("FUSED_WD_CLIP_GUARD", "1") != "0"


def _forget(key):
    def cb(_ref):
        _clipped.pop(key, None)
    return cb


def mark(optimizer, params):
    """Record that `optimizer` clips `params` (tensors), and wrap torch's
    clip_grad_norm_ once."""
    if not enabled() or _state["warned"]:
        return
    oref = weakref.ref(optimizer)
    for p in params:
        if isinstance(p, torch.Tensor):
            key = id(p)
            _clipped[key] = (weakref.ref(p, _forget(key)), oref)
    install()


def _owner(p):
    """The optimizer that clips p with fused_wd (alive, with a clipping group
    that holds p), or None."""
    hit = _clipped.get(id(p))
    if hit is None or hit[0]() is not p:
        return None
    opt = hit[1]()
    if opt is None:
        return None
    for group in opt.param_groups:
        if group.get("max_grad_norm") is not None and any(q is p for q in group["params"]):
            return opt
    return None


def check(parameters, max_norm, who):
    """Warn once if `who` clips (finite `max_norm`) parameters that a fused_wd
    optimizer also clips. `parameters` is a list of tensors."""
    if _state["warned"] or not _clipped:
        return
    if not isinstance(max_norm, torch.Tensor):
        try:
            if not math.isfinite(float(max_norm)):
                return  # max_norm=inf only measures the norm (HF Trainer with max_grad_norm=0)
        except (TypeError, ValueError):
            return
    for p in parameters:
        if id(p) in _clipped:
            opt = _owner(p)
            if opt is not None:
                _warn(opt, max_norm, who)
                return


def _warn(opt, max_norm, who):
    _state["warned"] = True
    _clipped.clear()
    limits = sorted({g["max_grad_norm"] for g in opt.param_groups if g.get("max_grad_norm") is not None})
    warnings.warn(
        f"{who}(max_norm={max_norm}) clips gradients that fused_wd.{type(opt).__name__} "
        f"(max_grad_norm={', '.join(map(str, limits))}) already clips inside its step: they are "
        "clipped twice (the same result when the limits are equal, the smaller limit wins "
        "otherwise) and the extra clip costs two more passes over the gradients. Turn one off: "
        "HF Trainer: TrainingArguments(max_grad_norm=0); Lightning: leave gradient_clip_val unset; "
        "Accelerate: drop accelerator.clip_grad_norm_; or build the optimizer without "
        "max_grad_norm. (Warned once; FUSED_WD_CLIP_GUARD=0 silences it.)",
        UserWarning, stacklevel=4)


def install():
    """Wrap torch.nn.utils.clip_grad_norm_, unless the wrapper is in place
    (checked each time: a test or a library may have put another function
    there since)."""
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_mod

    original = nn_utils.clip_grad_norm_
    if getattr(original, "__fused_wd_guard__", False):
        return

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        if not _state["warned"] and _clipped and not _compiling():
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            else:
                parameters = list(parameters)
            check(parameters, max_norm, "torch.nn.utils.clip_grad_norm_")
        return original(parameters, max_norm, *args, **kwargs)

    clip_grad_norm_.__doc__ = original.__doc__
    clip_grad_norm_.__wrapped__ = original
    clip_grad_norm_.__fused_wd_guard__ = True
    for mod in (nn_utils, clip_mod):
        if getattr(mod, "clip_grad_norm_", None) is original:
            mod.clip_grad_norm_ = clip_grad_norm_


def _compiling():
    try:
        return torch.compiler.is_compiling()
    except AttributeError:
        return False


def reset():
    """Forget what was warned and marked (for tests)."""
    _clipped.clear()
    _state["warned"] = False
