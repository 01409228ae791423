"""The optimizers' global gradient norm, from one partial per param
(docs/design.md, "The global norm").

Every param of an optimizer has a fixed slot, per device, in a float64
buffer: its partial (sum of squares of its grad, or max |g| for inf). A step
reduces the whole buffer in slot order, so the norm does not depend on when
or in what order the partials were written. By default a step writes every
partial itself. With `norm_in_backward=True`, a hook writes a param's partial
as soon as backward has accumulated its grad, while the grad is still in
cache, and the step rewrites only the partials it cannot prove current: the
grad is then the same tensor object, with the same version counter and data
pointer, as the one the hook read. A param without a grad on a step has a
zero partial (x + 0 == x: it changes no bit of the sum or the max).
"""
import functools
import weakref

import torch

from fused_wd import _ops
from fused_wd import distributed as _dist

# Grads smaller than this are batched (one op call, one CUDA launch or one
# CPU parallel region, for many params); a batch goes once it holds this many
# elements (4 MB of fp32: still in the last-level cache) or grads, and at the
# step. Larger grads are read at once.
_BATCH_ELEMS = 1 << 20
_BATCH_COUNT = 256


class NormSlots:
    """The slots of one optimizer. `view(t)` is the tensor whose norm counts
    (the local shard of a DTensor, the real view of a complex tensor)."""

    def __init__(self, optimizer, view):
        self._opt = weakref.ref(optimizer)
        self._view = view
        self._hooks = {}
        self.counts = {"from_backward": 0, "at_step": 0}
        # what the hooks assume until the next step checks it: the norm type
        # (None: nothing clips) and whether plain params' grads are reduced
        # after backward (see _hook)
        self._armed = (None, False)
        self.invalidate()

    # --------------------------------------------------------------- layout

    def invalidate(self):
        """Forget the slot layout and every partial (the param set changed)."""
        self._slot_of = None    # id(param) -> (device, slot)
        self._params_at = {}    # device -> [param id per slot]
        self._buffers = {}      # device -> float64 partials
        self._records = {}      # id(param) -> (weakref(grad), version, data_ptr, norm_type)
        self._pending = {}      # device -> ({slot: (param, grad, view of grad, slot)}, elements)

    def _layout(self):
        if self._slot_of is None:
            slot_of, params_at = {}, {}
            for group in self._opt().param_groups:
                for p in group["params"]:
                    dev = self._view(p).device
                    at = params_at.setdefault(dev, [])
                    slot_of[id(p)] = (dev, len(at))
                    at.append(id(p))
            self._slot_of, self._params_at = slot_of, params_at
        return self._slot_of

    def _buffer(self, dev):
        buf = self._buffers.get(dev)
        if buf is None:
            buf = torch.zeros(len(self._params_at[dev]), dtype=torch.float64, device=dev)
            self._buffers[dev] = buf
        return buf

    # ---------------------------------------------------------------- hooks

    def forget(self):
        """Mark every part as unproven (the grads changed behind the version
        counters)."""
        self._records.clear()

    def arm(self, norm_type):
        """What the hooks of the next backward work with (set at
        registration and by every step: the hooks take no look at the
        optimizer's groups or the process group themselves)."""
        self._armed = (norm_type, _dist.plain_grads_reduced())

    def register(self, params):
        """A post-accumulate-grad hook on each param that autograd fills."""
        _watch_unscale()
        opt = self._opt()
        self.arm(opt._clip_norm_type())
        for p in params:
            if id(p) not in self._hooks and p.requires_grad and p.is_leaf:
                self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    def remove(self):
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        self.invalidate()

    def _hook(self, p):
        norm_type, plain_reduced = self._armed
        g = p.grad
        # DDP all-reduces the grads after this hook: a part read now would be
        # this rank's alone, so the step computes it (see the README)
        if norm_type is None or g is None or (plain_reduced and not _dist.is_dtensor(p)):
            return
        slot_of = self._layout()
        e = self._view(g)
        dev, slot = slot_of[id(p)]
        if e.device != dev:  # the param moved since the layout was made
            self.invalidate()
            return
        n = e.numel()
        if n >= _BATCH_ELEMS:
            self._write(dev, [(p, g, e, slot)], norm_type)
            return
        # one entry per slot: a later grad of the same param (accumulation)
        # replaces the earlier one, whose part was never written
        queue, elems = self._pending.get(dev, ({}, 0))
        before = queue.get(slot)
        queue[slot] = (p, g, e, slot)
        elems += n - (0 if before is None else before[2].numel())
        self._pending[dev] = (queue, elems)
        if len(queue) >= _BATCH_COUNT or elems >= _BATCH_ELEMS:
            self._flush(dev, norm_type)

    def _write(self, dev, items, norm_type, zero=()):
        """Writes the partials of items [(param, grad, view, slot)] and zeros
        at the slots `zero`, in one call, and records what each partial was
        computed from."""
        _ops.norm_partials_([e for _, _, e, _ in items] + [None] * len(zero), self._buffer(dev),
                            [s for _, _, _, s in items] + list(zero), norm_type)
        for p, g, e, _ in items:
            self._records[id(p)] = (weakref.ref(g), e._version, e.data_ptr(), norm_type)

    def _flush(self, dev, norm_type):
        queue, _ = self._pending.pop(dev, ({}, 0))
        if queue:
            self._write(dev, list(queue.values()), norm_type)

    def _current(self, p, e, norm_type, plain_reduced):
        """Whether p's slot holds the partial of its grad as it is now (a
        plain param's grad reduced after backward never does)."""
        rec = self._records.get(id(p))
        return (rec is not None and rec[3] == norm_type and rec[0]() is p.grad
                and rec[1] == e._version and rec[2] == e.data_ptr()
                and not (plain_reduced and not _dist.is_dtensor(p)))

    # ----------------------------------------------------------------- step

    def norm(self, params, entries, norm_type):
        """The norm over entries (the view of each param's grad, or None for
        one that does not count here), as a float32 0-dim tensor: slots
        proven current are reused, the others written now."""
        slot_of = self._layout()
        if not self._hooks:
            return self._norm_at_step(slot_of, params, entries, norm_type)
        by_dev = {}
        for p, e in zip(params, entries):
            dev, slot = slot_of[id(p)]
            if e is not None and e.device != dev:
                self.invalidate()
                return self.norm(params, entries, norm_type)
            by_dev.setdefault(dev, []).append((p, e, slot))
        plain_reduced = _dist.plain_grads_reduced()
        norms = []
        for dev, items in by_dev.items():
            self._flush(dev, norm_type)
            norms.append(self._device_norm(dev, items, norm_type, plain_reduced))
        self._armed = (norm_type, plain_reduced)
        return _ops.combine_device_norms(norms, norm_type)

    def _norm_at_step(self, slot_of, params, entries, norm_type):
        """norm() without hooks: every part written now, one call per
        device, no records (the default path, kept cheap per param)."""
        by_dev = {}
        for p, e in zip(params, entries):
            dev, slot = slot_of[id(p)]
            lists = by_dev.get(dev)
            if lists is None:
                lists = by_dev[dev] = ([], [])
            lists[0].append(e)
            lists[1].append(slot)
        norms = []
        for dev, (ts, slots) in by_dev.items():
            n = len(self._params_at[dev])
            if len(slots) < n:  # params without a grad: zero parts
                missing = sorted(set(range(n)).difference(slots))
                ts, slots = ts + [None] * len(missing), slots + missing
            try:
                _ops.norm_partials_(ts, self._buffer(dev), slots, norm_type)
            except RuntimeError:
                # a param moved to another device since the layout was made:
                # lay the slots out again (the op checked before writing)
                if any(e is not None and e.device != dev for e in ts):
                    self.invalidate()
                    return self.norm(params, entries, norm_type)
                raise
            norms.append(_ops.norm_from_partials(self._buffer(dev), norm_type))
        self.counts["at_step"] += sum(e is not None for e in entries)
        return _ops.combine_device_norms(norms, norm_type)

    def _device_norm(self, dev, items, norm_type, plain_reduced):
        """norm() with hooks, on one device: parts proven current reused,
        the others written, the slots of params without a grad zeroed."""
        ids = self._params_at[dev]
        seen = bytearray(len(ids))
        write, zero = [], []
        reused = 0
        for p, e, slot in items:
            seen[slot] = 1
            if e is None:
                zero.append(slot)
            elif self._current(p, e, norm_type, plain_reduced):
                reused += 1
            else:
                write.append((p, p.grad, e, slot))
        zero.extend(s for s in range(len(ids)) if not seen[s])
        for s in zero:
            self._records.pop(ids[s], None)
        if write or zero:
            self._write(dev, write, norm_type, zero)
        self.counts["from_backward"] += reused
        self.counts["at_step"] += len(write)
        return _ops.norm_from_partials(self._buffer(dev), norm_type)


def _watch_unscale():
    """GradScaler.unscale_(optimizer) divides the grads in place with
    torch._amp_foreach_non_finite_check_and_unscale_, which does not advance
    their version counters: so that no part read before it is reused, it
    makes the optimizer's slots forget what they read. Installed the first
    time an optimizer registers norm hooks; only wraps torch's method."""
    cls = torch.amp.GradScaler
    if getattr(cls.unscale_, "_fused_wd_watch", False):
        return
    original = cls.unscale_

    @functools.wraps(original)
    def unscale_(self, optimizer):
        slots = getattr(optimizer, "_norm_slots", None)
        if isinstance(slots, NormSlots):
            slots.forget()
        return original(self, optimizer)

    unscale_._fused_wd_watch = True
    cls.unscale_ = unscale_
