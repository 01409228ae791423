"""Fake (meta) kernels of the fused_wd operators, so torch.compile and
FakeTensor tracing can reason about them; the lists each update op takes, as
named structures, and one wrapper per op that calls it by keyword; and the
thin device-aware glue the optimizers share."""
import dataclasses
import operator

import torch

from fused_wd import _ext

if _ext.C is not None:

    @torch.library.register_fake("fused_wd::multi_tensor_norm")
    def _norm_fake(tensors, norm_type):
        torch._check(len(tensors) > 0, lambda: "multi_tensor_norm needs at least one tensor")
        return tensors[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fused_wd::norm_partials_")
    def _norm_partials_fake(tensors, out, index, norm_type):
        return None

    @torch.library.register_fake("fused_wd::norm_from_partials")
    def _norm_from_partials_fake(partials, norm_type):
        return partials.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fused_wd::clip_")
    def _clip_fake(tensors, total_norm, max_norm):
        return None

    @torch.library.register_fake("fused_wd::adam_")
    def _adam_fake(*args, **kwargs):
        return None

    @torch.library.register_fake("fused_wd::sgd_")
    def _sgd_fake(*args, **kwargs):
        return None

    @torch.library.register_fake("fused_wd::auto_decay")
    def _auto_decay_fake(stats, grad_sumsq, steps, numels, state, **kwargs):
        return stats.new_empty((), dtype=torch.float64)


# A C++ list of tensors (torch's own IValue list). A kept plan holds its
# param and state lists as these and hands them to the op as they are. Why:
# (1) an op called with a Python list converts it element by element into a
# C++ list, a C++ list goes in as it is (about 0.3 us per tensor and list
# saved with thousands of tensors); (2) an op drops its argument lists with
# the GIL released, and a tensor whose only C++ reference was that list then
# releases its Python object, taking the GIL once per tensor; the plan's own
# list keeps that reference (grads need nothing: the param holds its grad).
# The op sees the same tensors either way. Absent from a torch build, plans
# keep Python lists.
CppList = getattr(torch._C, "ScriptList", None)


def _same_items_py(a, b):
    return len(a) == len(b) and all(map(operator.is_, a, b))


# Whether two lists or tuples hold the same objects, by identity: one pointer
# comparison per item in C (csrc/ops.cpp), about 10 ns an item less than
# map(operator.is_) (a step's plan checks its params each step).
same_items = getattr(_ext.C, "same_items", _same_items_py)


class _Lists:
    def select(self, idx):
        """The same lists restricted to the params at idx."""
        if len(idx) == len(self.params):
            return self
        return dataclasses.replace(self, **{f.name: [getattr(self, f.name)[i] for i in idx]
                                            for f in dataclasses.fields(self) if getattr(self, f.name)})


@dataclasses.dataclass
class AdamLists(_Lists):
    """What adam_ takes, one entry per param (empty lists: not used).
    master_params holds an fp32 master or None per param; the op gets the
    params of one kind per call (see split_by_master)."""
    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list
    state_steps: list
    master_params: list
    sr_ids: list


@dataclasses.dataclass
class SgdLists(_Lists):
    """What sgd_ takes, one entry per param (empty lists: not used)."""
    params: list
    grads: list
    momentum_buffers: list
    buffer_is_new: list
    master_params: list
    state_steps: list
    sr_ids: list


def split_by_master(masters):
    """[(indices, has_master)]: the params without an fp32 master, then those
    with one; each set is one op call."""
    without = [i for i, m in enumerate(masters) if m is None]
    with_master = [i for i, m in enumerate(masters) if m is not None]
    return [(idx, has) for idx, has in ((without, False), (with_master, True)) if idx]


def adam_args(lists, stats=None, stat_slots=(), wd_tensor=None, **hyper):
    """The keyword arguments of torch.ops.fused_wd.adam_ on an AdamLists
    whose params all have a master or none has (master_params then empty);
    hyperparameters by name (those left out take the schema's defaults).
    stats/stat_slots: where the pass writes its statistics (csrc/schema.h).
    lists.grads None: each param's own grad (grads_from_params)."""
    return dict(params=lists.params, grads=[] if lists.grads is None else lists.grads,
                exp_avgs=lists.exp_avgs, exp_avg_sqs=lists.exp_avg_sqs,
                max_exp_avg_sqs=lists.max_exp_avg_sqs, state_steps=lists.state_steps,
                master_params=lists.master_params, **_extras(lists, stats, stat_slots, wd_tensor), **hyper)


def adam_(lists, **kw):
    """torch.ops.fused_wd.adam_ with adam_args's arguments."""
    _ext.require()
    torch.ops.fused_wd.adam_(**adam_args(lists, **kw))


def sgd_args(lists, stats=None, stat_slots=(), wd_tensor=None, **hyper):
    """The keyword arguments of torch.ops.fused_wd.sgd_ on an SgdLists;
    hyperparameters by name; lists.grads None as for adam_args."""
    return dict(params=lists.params, grads=[] if lists.grads is None else lists.grads,
                momentum_buffers=lists.momentum_buffers, buffer_is_new=lists.buffer_is_new,
                master_params=lists.master_params, state_steps=lists.state_steps,
                **_extras(lists, stats, stat_slots, wd_tensor), **hyper)


def sgd_(lists, **kw):
    """torch.ops.fused_wd.sgd_ with sgd_args's arguments."""
    _ext.require()
    torch.ops.fused_wd.sgd_(**sgd_args(lists, **kw))


def _extras(lists, stats, stat_slots, wd_tensor):
    """The update ops' optional arguments that differ from their defaults."""
    kw = {}
    if lists.grads is None:
        kw["grads_from_params"] = True
    if lists.sr_ids:
        kw["sr_ids"] = lists.sr_ids
    if stats is not None:
        kw["stats"], kw["stat_slots"] = stats, list(stat_slots)
    if wd_tensor is not None:
        kw["wd_tensor"] = wd_tensor
    return kw


def auto_decay(stats, grad_sumsq, steps, numels, state, **hyper):
    """torch.ops.fused_wd.auto_decay: the decay strength of an automatic
    mode for this step (float64 0-dim, on the statistics' device)."""
    _ext.require()
    return torch.ops.fused_wd.auto_decay(stats=stats, grad_sumsq=grad_sumsq, steps=steps,
                                         numels=numels, state=state, **hyper)


def group_by_device(items, device_of=lambda t: t.device):
    """{device: [items]} in first-seen order."""
    out = {}
    for x in items:
        out.setdefault(device_of(x), []).append(x)
    return out


def multi_tensor_norm(tensors, norm_type=2.0):
    """Global norm of tensors on any devices, as a float32 0-dim tensor on
    the first tensor's device. One kernel per device; no host sync."""
    _ext.require()
    return combine_device_norms([torch.ops.fused_wd.multi_tensor_norm(ts, float(norm_type))
                                 for ts in group_by_device(tensors).values()], norm_type)


def combine_device_norms(norms, norm_type):
    """The global norm from per-device norms, on the first one's device."""
    if len(norms) == 1:
        return norms[0]
    first = norms[0].device
    stacked = torch.stack([n.to(first, non_blocking=True) for n in norms])
    return torch.linalg.vector_norm(stacked, ord=float(norm_type))


def norm_partials_(tensors, out, index, norm_type, of_grads=False):
    """torch.ops.fused_wd.norm_partials_: the partial of tensors[j] (None or
    empty: 0; of_grads: of tensors[j].grad) written at out[index[j]]."""
    _ext.require()
    torch.ops.fused_wd.norm_partials_(tensors=tensors, out=out, index=index,
                                      norm_type=float(norm_type), of_grads=of_grads)


# The c10::ScalarType codes of the dtypes the kernels take (grads_ready's
# dtypes; c10/core/ScalarType.h, the codes torch serializes dtypes with).
SCALAR_TYPE_CODES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}


# The KeptCall setter for each argument type of the schemas (csrc/kept_call.cpp).
_KEPT_SETTERS = {"List[Tensor]": "tensors", "Optional[Tensor]": "tensor", "float": "floating", "int": "integer",
                 "bool": "boolean", "List[int]": "integers", "List[bool]": "booleans"}


def kept_call(op_name, kwargs, namespace="fused_wd"):
    """A torch.classes.fused_wd.KeptCall of torch.ops.<namespace>.<op_name>
    holding these keyword arguments: kept.run(lr, grad_norm) then calls the
    op with them (lr and grad_norm as given), with no Python argument
    parsing. Each value is set by its schema type, which the class checks.
    (namespace: fused_wd_emu for the host build of the CUDA ops, which
    benchmarks/cuda_host_cost.py times.)"""
    _ext.require()
    schema = getattr(getattr(torch.ops, namespace), op_name).default._schema
    types = {a.name: str(a.type) for a in schema.arguments}
    kept = torch.classes.fused_wd.KeptCall(schema.name)
    for name, value in kwargs.items():
        if name not in types:
            raise TypeError(f"fused_wd.{op_name} has no argument {name!r}")
        getattr(kept, _KEPT_SETTERS[types[name]])(name, value)
    return kept


def grads_ready(params, dtypes):
    """torch.ops.fused_wd.grads_ready: whether every param still has the
    dtype dtypes (SCALAR_TYPE_CODES) names and a grad the ops can take from
    it (grads_from_params, of_grads)."""
    _ext.require()
    return torch.ops.fused_wd.grads_ready(params, dtypes)


def norm_from_partials(partials, norm_type):
    """torch.ops.fused_wd.norm_from_partials: the norm of every partial, in
    slot order (float32 0-dim, on the partials' device)."""
    _ext.require()
    return torch.ops.fused_wd.norm_from_partials(partials=partials, norm_type=float(norm_type))
