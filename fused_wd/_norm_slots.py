"""The optimizers' global gradient norm, from one partial per param
(docs/design.md, "The global norm").

Every param of an optimizer has a fixed slot, per device, in a float64
buffer: its partial (sum of squares of its grad, or max |g| for inf). A step
reduces the whole buffer in slot order, so the norm does not depend on when
or in what order the partials were written. By default a step writes every
partial itself. With `norm_in_backward=True`, a hook on each param of
_HOOK_READ_MIN elements or more writes its partial as soon as backward has
accumulated its grad, and the step rewrites only the partials it cannot
prove current: the grad is then the same tensor object, with the same
version counter and data pointer, as the one the hook read. Smaller params
have no hook: the step reads their grads, all in one op call. A param
without a grad on a step has a zero partial (x + 0 == x: it changes no bit
of the sum or the max).
"""
import functools
import itertools
import operator
import weakref

import torch

from fused_wd import _ext
from fused_wd import _ops
from fused_wd import distributed as _dist

_CppList = _ops.CppList

# Params of this many elements or more get a hook that reads the grad in
# backward (one op call: one CUDA launch, or one CPU parallel region). A
# smaller grad costs less to read at the step, with every other small grad in
# one call, than a hook costs in backward: on the CPU measured (a 2-core
# Zen 5 VM) a hook with its op call cost 20-25 us in a real backward
# (torch's call of a Python hook, its cold Python, the op call), the time
# the step takes to read 150K-250K elements; on the small GPT of the
# benchmark, 128K against 32K here made the clipped iteration 0.3-0.4%
# cheaper. Larger sizes trade the 50M-param set's step for the GPT's
# iteration (docs/design.md, "The global norm"). Unmeasured on a GPU.
_HOOK_READ_MIN = 1 << 17


class _Absent:
    """The source of a row whose tensor does not exist (a param without
    state yet): its sum is 0."""


_ABSENT = _Absent()


def _absent():
    return _ABSENT


# the record of a param whose part was never read: it proves nothing
_NO_RECORD = (_absent, -1, -1, None)


def _op_lists(tensors, slots):
    """tensors (optional tensors) and slots as C++ lists, which the op takes
    without a conversion per element, as the plans' lists (fused_wd/optim.py);
    the list of optional tensors is inferred from a None, dropped again.
    Python lists where torch has no ScriptList."""
    if _CppList is None:
        return list(tensors), list(slots)
    ts = _CppList(list(tensors) + [None])
    ts.pop()
    return ts, _CppList(slots)


def _record(t):
    return (_absent, 0, 0) if t is None else (weakref.ref(t), t._version, t.data_ptr())


def _holds(rec, t):
    if t is None:
        return rec[0] is _absent
    return rec[0]() is t and rec[1] == t._version and rec[2] == t.data_ptr()


def _same(kept, params):
    """Whether params holds the same objects as kept, in order."""
    return kept is params or _ops.same_items(kept, params)


_version_of = operator.attrgetter("_version")
_ptr_of = operator.methodcaller("data_ptr")
_grad_of = operator.attrgetter("grad")
_deref = operator.methodcaller("__call__")
_rec_source, _rec_version, _rec_ptr, _rec_norm_type = map(operator.itemgetter, range(4))


class _Selection:
    """The params of one automatic decay mode, laid out once: ordered by
    device (the order of everything gathered for them), each device's slot
    index tensor, their element counts, and the snapshots make_current
    proves their rows against."""

    def __init__(self, slots, params):
        self.given = list(params)
        slot_of = slots._layout()
        by_dev = {}
        for k, p in enumerate(self.given):
            dev, slot = slot_of[id(p)]
            by_dev.setdefault(dev, []).append((k, slot))
        self.perm = [k for items in by_dev.values() for k, _ in items]
        self.params = [self.given[k] for k in self.perm]
        self.device = next(iter(by_dev))
        self.parts = [(dev, slots._index_of(dev, [slot for _, slot in items])) for dev, items in by_dev.items()]
        self.numels = torch.tensor([float(slots._view(p).numel()) for p in self.params], dtype=torch.float64,
                                   device=self.device)
        self.snaps = {}

    def holds(self, params):
        return len(params) == len(self.given) and all(map(operator.is_, params, self.given))

    def ordered(self, xs):
        """xs (one per given param) in self.params' order."""
        return xs if len(self.parts) == 1 else [xs[k] for k in self.perm]


class _StatsMixin:
    """Statistics of the update pass, per slot (csrc/schema.h, adam_'s
    stats): row 0 the sum of p^2 of the param (of its fp32 master when it
    has one), row 1 the sum of its exp_avg_sq. The ops write both for every
    param they update, as by-products, once `tracking` is on. A row is
    current while the tensor it describes is the one it was read from, with
    the same version counter and data pointer: the fused ops update params
    and moments without advancing version counters, so a row the pass
    rewrites stays current, and anything else that writes the tensor in
    place (copy_, load_state_dict's new tensors, a new master) shows. A stale
    row is read again (one read of that tensor), never used."""

    def stats_buffer(self, dev):
        buf = self._stats.get(dev)
        if buf is None:
            buf = torch.zeros(2, len(self._params_at[dev]), dtype=torch.float64, device=dev)
            self._stats[dev] = buf
        return buf

    def stat_args(self, params, device):
        """(stats, stat_slots) for an op call over params on `device`."""
        slot_of = self._layout()
        slots = []
        for p in params:
            dev, slot = slot_of[id(p)]
            if dev != device:
                raise RuntimeError("fused_wd: a parameter moved to another device after the optimizer "
                                   "laid out its slots; its statistics cannot follow")
            slots.append(slot)
        return self.stats_buffer(device), slots

    def _sources(self, params, row):
        """The tensor each param's row describes: row 0 the param or its
        master, row 1 its exp_avg_sq (None without state)."""
        states = map(self._opt().state.get, params)
        if row == 0:
            return [p if d is None or d.get("master_param") is None else d["master_param"]
                    for p, d in zip(params, states)]
        return [None if d is None else d.get("exp_avg_sq") for d in states]

    def make_current(self, params, rows, snaps=None):
        """Reads again the rows (0, 1 or both) of params that are not
        current. `snaps` (a dict kept by the caller for the same params):
        what the rows were last proven against, as lists (sources, their
        versions and data pointers), so that an unchanged set is proven in
        three C loops instead of a record lookup per param."""
        slot_of = self._layout()
        for row in rows:
            srcs = self._sources(params, row)
            snap = None if snaps is None else snaps.get(row)
            if snap is not None and all(map(operator.is_, srcs, snap[0])) \
                    and list(map(_version_of, srcs)) == snap[1] and list(map(_ptr_of, srcs)) == snap[2]:
                continue
            recs = self._stat_recs[row]
            stale = {}
            for p, src in zip(params, srcs):
                rec = recs.get(id(p))
                if rec is None or not _holds(rec, src):
                    dev, slot = slot_of[id(p)]
                    stale.setdefault(dev, []).append((p, src, slot))
            for dev, items in stale.items():
                buf = self.stats_buffer(dev)
                present = [(p, src, slot) for p, src, slot in items if src is not None]
                absent = [slot for _, src, slot in items if src is None]
                if absent:
                    buf[row].index_fill_(0, self._index_of(dev, absent), 0.0)
                if present and row == 0:
                    _ops.norm_partials_([self._view(src) for _, src, _ in present], buf[0],
                                        [slot for _, _, slot in present], 2.0)
                elif present:
                    sums = torch.stack([self._view(src).sum(dtype=torch.float64) for _, src, _ in present])
                    buf[1].index_copy_(0, self._index_of(dev, [slot for _, _, slot in present]), sums)
                for p, src, _ in items:
                    recs[id(p)] = _record(src)
                self.stat_reads += len(items)
            if snaps is not None and None not in srcs:
                snaps[row] = (srcs, list(map(_version_of, srcs)), list(map(_ptr_of, srcs)))

    def constant(self, dev, values, dtype):
        """torch.tensor(values) on dev, made once per distinct values (a
        step under CUDA graph capture makes no host-to-device copy)."""
        key = (dev, dtype, tuple(values))
        t = self._index.get(key)
        if t is None:
            if len(self._index) > 64:
                self._index.clear()
            t = self._index[key] = torch.tensor(values, dtype=dtype, device=dev)
        return t

    def _index_of(self, dev, slots):
        return self.constant(dev, slots, torch.long)

    def select(self, key, params):
        """The _Selection of params (kept under `key` while the same params
        come in the same order)."""
        sel = self._selections.get(key)
        if sel is None or not sel.holds(params):
            sel = self._selections[key] = _Selection(self, params)
        return sel

    def gather(self, sel, buffers):
        """The columns of `buffers(dev)` (a [2, slots] or [slots] tensor per
        device) at the slots of sel's params, in sel.params' order, on its
        first device."""
        parts = [buffers(dev).index_select(-1, idx).to(sel.device, non_blocking=True)
                 for dev, idx in sel.parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def grad_sumsq(self, sel, grads, from_norm):
        """The sum of squares of each grad (its partial of the 2-norm) of
        sel's params (grads in sel.params' order): from the norm's own slots
        when this step's norm was a 2-norm over them (from_norm), else read
        now into a separate buffer."""
        if from_norm:
            return self.gather(sel, self._buffer)
        slot_of = self._layout()
        by_dev = {}
        for p, g in zip(sel.params, grads):
            dev, slot = slot_of[id(p)]
            by_dev.setdefault(dev, ([], []))
            by_dev[dev][0].append(self._view(g))
            by_dev[dev][1].append(slot)
        bufs = {}
        for dev, (gs, slots) in by_dev.items():
            buf = torch.zeros(len(self._params_at[dev]), dtype=torch.float64, device=dev)
            _ops.norm_partials_(gs, buf, slots, 2.0)
            bufs[dev] = buf
        return self.gather(sel, bufs.__getitem__)

    def weight_norm(self):
        """The 2-norm of every param of the optimizer (their masters where
        they have one), from the rows; stale rows read again."""
        params = [p for group in self._opt().param_groups for p in group["params"]]
        if not params:
            return None
        self.tracking = True
        self.make_current(params, (0,))
        norms = [_ops.norm_from_partials(self.stats_buffer(dev)[0], 2.0) for dev in self._params_at]
        return _ops.combine_device_norms(norms, 2.0)


class NormSlots(_StatsMixin):
    """The slots of one optimizer. `view(t)` is the tensor whose norm counts
    (the local shard of a DTensor, the real view of a complex tensor)."""

    def __init__(self, optimizer, view):
        self._opt = weakref.ref(optimizer)
        self._view = view
        self._hooks = {}
        # parts from the hooks; parts the step computed because no hook wrote
        # one it could prove ("at_step": every part without norm_in_backward);
        # parts of the params without a hook, which the step reads
        self.counts = {"from_backward": 0, "at_step": 0, "small": 0}
        # statistics of the update pass (see "Statistics" below): off until
        # something reads them, then every step's ops write them
        self.tracking = False
        self.stat_reads = 0
        # what the hooks assume until the next step checks it: the norm type
        # (None: nothing clips) and whether plain params' grads are reduced
        # after backward (see _hook)
        self._armed = (None, False)
        self.invalidate()

    # --------------------------------------------------------------- layout

    def invalidate(self):
        """Forget the slot layout and every partial (the param set changed)."""
        self._slot_of = None    # id(param) -> (device, slot)
        self._on_cuda = False   # a slot's device is a CUDA device
        self._params_at = {}    # device -> [param id per slot]
        self._buffers = {}      # device -> float64 partials
        self._records = {}      # id(param) -> (weakref(grad), version, data_ptr, norm_type)
        self._split = None      # (layout, params, split) of the last _all_proven (see _split_of)
        self._stats = {}        # device -> float64 [2, slots]: sum p^2, sum exp_avg_sq
        self._stat_recs = ({}, {})  # per row: id(param) -> (weakref(source), version, data_ptr)
        self._index = {}        # (device, dtype, values) -> tensor (see constant())
        self._selections = {}   # key -> _Selection (see select())
        self._at_step = None    # (layout, params, per-device split) of the last _norm_at_step

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
            self._on_cuda = any(dev.type == "cuda" for dev in params_at)
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
        _ext.require()
        # the op itself (OpOverload's C++ function, where torch has one): no
        # Python frame
        overload = torch.ops.fused_wd.norm_partials_.default
        self._read = getattr(overload, "_op", overload)
        opt = self._opt()
        self.arm(opt._clip_norm_type())
        for p in params:
            if id(p) not in self._hooks and p.requires_grad and p.is_leaf \
                    and self._view(p).numel() >= _HOOK_READ_MIN:
                self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    def remove(self):
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        self.invalidate()

    def _hook(self, p):
        """Writes p's part as soon as backward has finished its grad, and
        records what it read. Kept short, with the op called without
        torch.ops' packet or norm_partials_'s wrapper: a hook's Python is
        most of what it costs in backward (see _HOOK_READ_MIN)."""
        norm_type, plain_reduced = self._armed
        g = p.grad
        # nothing clips; or DDP all-reduces the grads after this hook: a part
        # read now would be this rank's alone, so the step computes it (see
        # the README)
        if norm_type is None or g is None or plain_reduced and not _dist.is_dtensor(p):
            return
        dev, slot = (self._slot_of or self._layout())[id(p)]
        e = self._view(g)
        if e.device != dev:  # the param moved since the layout was made
            self.invalidate()
            return
        buf = self._buffers.get(dev)
        if buf is None:
            buf = self._buffer(dev)
        self._read(tensors=[e], out=buf, index=[slot], norm_type=norm_type)
        self._records[id(p)] = (weakref.ref(g), e._version, e.data_ptr(), norm_type)

    def _write(self, dev, items, norm_type, zero=()):
        """Writes the partials of items [(param, grad, view, slot)] and zeros
        at the slots `zero`, in one call, and records what the partial of
        each param with a hook was computed from. Only those have records:
        a small param's slot is also written by _all_proven, which keeps
        none, so a record of it could vouch for a part since overwritten."""
        _ops.norm_partials_([e for _, _, e, _ in items] + [None] * len(zero), self._buffer(dev),
                            [s for _, _, _, s in items] + list(zero), norm_type)
        for p, g, e, _ in items:
            if id(p) in self._hooks:
                self._records[id(p)] = (weakref.ref(g), e._version, e.data_ptr(), norm_type)

    def _proofs(self, params, grads, views, norm_type):
        """Per param, whether its slot holds the part of its grad as it is
        now: its record names this grad object (a weak reference: a grad
        freed and another made at its address is not the same), the version
        counter and data pointer of its view (`views`: what was read, the
        local shard of a DTensor) and the norm type. In C loops over the
        lists. (Under DDP a plain param's part is never current: the
        callers see to that.)"""
        recs = list(map(self._records.get, map(id, params), itertools.repeat(_NO_RECORD)))
        return list(map(all, zip(map(operator.is_, map(_deref, map(_rec_source, recs)), grads),
                                 map(operator.eq, map(_rec_version, recs), map(_version_of, views)),
                                 map(operator.eq, map(_rec_ptr, recs), map(_ptr_of, views)),
                                 map(operator.eq, map(_rec_norm_type, recs), itertools.repeat(norm_type)))))

    # ----------------------------------------------------------------- step

    @property
    def hooked(self):
        """Whether norm hooks are registered (norm_in_backward)."""
        return bool(self._hooks)

    def norm(self, params, entries, norm_type):
        """The norm over entries (the view of each param's grad, or None for
        one that does not count here), as a float32 0-dim tensor: slots
        proven current are reused, the others written now. entries None:
        each param's own grad (a step whose grads grads_ready accepted):
        without hooks read by the op, with hooks proven in bulk
        (_all_proven) or, failing that, one by one."""
        slot_of = self._layout()
        if not self._hooks:
            # with norm_in_backward on, no param was large enough for a hook
            return self._norm_at_step(slot_of, params, entries, norm_type,
                                      count="small" if self._opt().norm_in_backward else "at_step")
        if self._on_cuda and torch.cuda.is_current_stream_capturing():
            # a step captured in a CUDA graph reads every grad itself: a
            # replay cannot check that a hook's part is current (the grads
            # may have been loaded by a copy, with no backward)
            self._records.clear()
            return self._norm_at_step(slot_of, params, entries, norm_type)
        if entries is None:
            proven = self._all_proven(params, norm_type)
            if proven is not None:
                return proven
            entries = [self._view(g) for g in map(_grad_of, params)]
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
            norms.append(self._device_norm(dev, items, norm_type, plain_reduced))
        self._armed = (norm_type, plain_reduced)
        return _ops.combine_device_norms(norms, norm_type)

    def _all_proven(self, params, norm_type):
        """norm() of the params' own grads (a step whose grads grads_ready
        accepted: every param has a plain dense grad) when every slot of
        every device belongs to one of them and the part of each param with
        a hook is current (_proofs, in C loops): the parts of the params
        without one are read now, by the op, one call per device. Else None,
        with nothing read."""
        slot_of = self._layout()
        plain_reduced = _dist.plain_grads_reduced()
        if plain_reduced or len(params) != len(slot_of):
            return None
        hooked, reads, n_read = self._split_of(slot_of, params)
        if hooked:
            # own grads are plain and real (grads_ready): each is its own view
            grads = list(map(_grad_of, hooked))
            if not all(self._proofs(hooked, grads, grads, norm_type)):
                return None
        for dev, ts, slots in reads:
            try:
                _ops.norm_partials_(ts, self._buffer(dev), slots, norm_type, of_grads=True)
            except RuntimeError:
                return None  # a param moved to another device: norm() finds it
        self.counts["from_backward"] += len(hooked)
        self.counts["small"] += n_read
        self._armed = (norm_type, plain_reduced)
        return _ops.combine_device_norms([_ops.norm_from_partials(self._buffer(dev), norm_type)
                                          for dev in self._params_at], norm_type)

    def _split_of(self, slot_of, params):
        """(the params with a hook, [(device, the others' tensors, their
        slots)] as the op's lists, how many others): made once for the same
        params under the same layout (hooks change only with a new one)."""
        memo = self._split
        if memo is not None and memo[0] is slot_of and _same(memo[1], params):
            return memo[2]
        hooked, by_dev = [], {}
        for p in params:
            if id(p) in self._hooks:
                hooked.append(p)
            else:
                dev, slot = slot_of[id(p)]
                ts, slots = by_dev.setdefault(dev, ([], []))
                ts.append(p)
                slots.append(slot)
        split = (hooked, [(dev, *_op_lists(ts, slots)) for dev, (ts, slots) in by_dev.items()],
                 len(params) - len(hooked))
        self._split = (slot_of, params, split)
        return split

    def _norm_at_step(self, slot_of, params, entries, norm_type, count="at_step"):
        """norm() without hooks: every part written now, one call per
        device, no records, counted under `count` (the default path, or
        norm_in_backward with no param large enough for a hook). Kept cheap
        per param: the split of the same params as the last call, under the
        same layout, is reused after one identity check per param."""
        memo = self._at_step
        if memo is not None and memo[0] is slot_of and _same(memo[1], params):
            split = memo[2]
        else:
            by_dev = {}
            for k, p in enumerate(params):
                dev, slot = slot_of[id(p)]
                by_dev.setdefault(dev, ([], []))
                by_dev[dev][0].append(k)
                by_dev[dev][1].append(slot)
            split = []
            for dev, (ks, slots) in by_dev.items():
                n = len(self._params_at[dev])
                missing = sorted(set(range(n)).difference(slots)) if len(slots) < n else []
                # positions None: every param of the call, in order
                split.append((dev, None if len(by_dev) == 1 else ks, slots + missing, len(missing), {}))
            # params itself: the step's lists are never changed after the call
            self._at_step = (slot_of, params, split)
        norms = []
        of_grads = entries is None
        if of_grads:
            entries = params
        for dev, ks, slots, nmissing, kept in split:
            if of_grads and kept:  # the same params as the last call: their lists, made once
                ts, slots = kept["tensors"], kept["slots"]
            else:
                ts = list(entries) if ks is None else list(map(entries.__getitem__, ks))
                if nmissing:  # params without a grad: zero parts
                    ts += [None] * nmissing
                if of_grads:
                    ts, slots = _op_lists(ts, slots)
                    kept["tensors"], kept["slots"] = ts, slots
            try:
                _ops.norm_partials_(ts, self._buffer(dev), slots, norm_type, of_grads=of_grads)
            except RuntimeError:
                # a param moved to another device since the layout was made:
                # lay the slots out again (the op checked before writing)
                if any(e is not None and e.device != dev for e in ts):
                    self.invalidate()
                    return self.norm(params, entries, norm_type)
                raise
            norms.append(_ops.norm_from_partials(self._buffer(dev), norm_type))
        self.counts[count] += len(entries) if of_grads else \
            sum(map(operator.is_not, entries, itertools.repeat(None)))
        return _ops.combine_device_norms(norms, norm_type)

    def _device_norm(self, dev, items, norm_type, plain_reduced):
        """norm() with hooks, on one device: parts proven current reused,
        the others written, the slots of params without a grad zeroed."""
        ids = self._params_at[dev]
        seen = bytearray(len(ids))
        write, zero = [], []
        present = []
        for p, e, slot in items:
            seen[slot] = 1
            if e is None:
                zero.append(slot)
            else:
                present.append((p, e, slot))
        params = [p for p, _, _ in present]
        grads = list(map(_grad_of, params))
        proofs = self._proofs(params, grads, [e for _, e, _ in present], norm_type)
        if plain_reduced:  # DDP rewrote the plain params' grads after their hooks
            proofs = [ok and _dist.is_dtensor(p) for ok, p in zip(proofs, params)]
        reused = sum(proofs)
        write.extend((p, g, e, slot) for (p, e, slot), g, ok in zip(present, grads, proofs) if not ok)
        zero.extend(s for s in range(len(ids)) if not seen[s])
        for s in zero:
            self._records.pop(ids[s], None)
        if write or zero:
            self._write(dev, write, norm_type, zero)
        small = sum(1 for p, _, _, _ in write if id(p) not in self._hooks)
        self.counts["from_backward"] += reused
        self.counts["at_step"] += len(write) - small
        self.counts["small"] += small
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
