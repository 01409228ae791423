"""DTensor support (FSDP2 `fully_shard`, HSDP, any Shard/Replicate layout):
local views of DTensor params, grads and states, and the global gradient norm
across ranks.

The norm is one fused local pass plus one all-reduce: each rank runs the
`multi_tensor_norm` kernel over the local shards it must count (L2: the local
norm squared into a float64 sum of squares; inf: the local max), a single
all-reduce (SUM or MAX) over the mesh dims where the grads are sharded
combines the partials, and the sqrt follows, all on the device (no host
sync). A grad that is replicated along a reduced mesh dim (a Replicate
placement there, or a plain tensor: DDP, unwrapped params) is counted only by
the ranks at coordinate 0 of that dim, so nothing is counted twice. Mesh dims
where every grad is replicated (the replicate dim of HSDP) are not reduced
over at all.

Refused with a clear error, never a wrong norm: Partial and _StridedShard
placements (and any other placement but Shard and Replicate), grads on more
than one device mesh, a grad whose placements differ from its param's, and
sharding over several mesh dims of a mesh that is not the whole world.
"""
import math
import sys

import torch


class _NoDTensor:
    """Stands for DTensor while torch.distributed.tensor is not imported: no
    DTensor can exist then, and isinstance against this is always False."""


DTensor = _NoDTensor


def refresh():
    """Resolves `DTensor` once torch.distributed.tensor has been imported (by
    whoever made a DTensor). Importing it with fused_wd would add half a
    second to `import fused_wd`; a dict lookup per step costs nothing."""
    global DTensor
    if DTensor is _NoDTensor:
        mod = sys.modules.get("torch.distributed.tensor")
        cls = getattr(mod, "DTensor", None) if mod is not None else None
        if cls is not None:
            DTensor = cls
    return DTensor is not _NoDTensor


def local(t):
    """The local shard of a DTensor (same storage: in-place writes land in
    the DTensor), else `t` itself. `_local_tensor` is what `to_local()`
    returns under no_grad, without the per-call view it makes for
    Parameter(DTensor)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def plain_grads_reduced():
    """Whether a collective may rewrite a plain (non-DTensor) param's grad
    after its post-accumulate-grad hook ran: a process group of more than one
    rank exists, as under DDP, whose all-reduce averages the grads after the
    hooks. (FSDP2's sharded DTensor params run their hooks after the
    reduce-scatter, on the final grad.)"""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_dtensor(t):
    refresh()
    return isinstance(t, DTensor)


def _describe(t):
    if isinstance(t, DTensor):
        return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
    return "a plain tensor"


def _same_layout(a, b):
    return (isinstance(a, DTensor) and isinstance(b, DTensor) and a.device_mesh == b.device_mesh
            and tuple(a.placements) == tuple(b.placements))


def check_layouts(opt, pairs, state, gi):
    """Before the kernels get local shards: a DTensor param's grad and state
    must be DTensors laid out like it (as autograd, torch.optim and DCP's
    set_optimizer_state_dict make them), or the shards would not line up;
    and a Partial param has no elementwise update. Plain params pass."""
    for p, g in pairs:
        if not isinstance(p, DTensor):
            if isinstance(g, DTensor):
                raise RuntimeError(
                    f"fused_wd.{opt}: param group {gi}: a plain parameter of shape "
                    f"{tuple(p.shape)} has a DTensor grad ({_describe(g)})")
            continue
        if not _same_layout(p, g):
            raise RuntimeError(
                f"fused_wd.{opt}: param group {gi}: a parameter of shape {tuple(p.shape)} is "
                f"{_describe(p)} but its grad is {_describe(g)}; fused_wd updates the local "
                "shards and needs the grad laid out like its parameter (redistribute it first)")
        if any(pl.is_partial() for pl in p.placements):
            raise RuntimeError(
                f"fused_wd.{opt}: param group {gi}: a parameter of shape {tuple(p.shape)} has a "
                f"Partial placement {tuple(p.placements)}: the update is not elementwise on the "
                "pending-sum pieces of a Partial tensor; redistribute it to Shard or Replicate")
        for name, s in state.get(p, {}).items():
            if name != "step" and isinstance(s, torch.Tensor) and not _same_layout(p, s):
                raise RuntimeError(
                    f"fused_wd.{opt}: param group {gi}: optimizer state '{name}' is "
                    f"{_describe(s)} but its parameter (shape {tuple(p.shape)}) is "
                    f"{_describe(p)}; load sharded optimizer state with torch.distributed."
                    "checkpoint.state_dict.set_optimizer_state_dict")


def any_dtensor(tensors):
    if DTensor is _NoDTensor:
        return False
    for t in tensors:
        if isinstance(t, DTensor):
            return True
    return False


def _sharded_dims(g):
    """The mesh dims along which grad g is sharded; refuses what is neither
    Shard nor Replicate."""
    from torch.distributed.tensor import Replicate, Shard
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # older torch
        _StridedShard = ()
    dims = []
    for d, pl in enumerate(g.placements):
        if isinstance(pl, Shard) and not isinstance(pl, _StridedShard):
            dims.append(d)
        elif isinstance(pl, Replicate):
            continue
        else:
            raise ValueError(
                f"fused_wd: cannot compute the global grad norm of a DTensor grad of shape "
                f"{tuple(g.shape)} with placements {tuple(g.placements)}: only Shard(dim) and "
                f"Replicate() are supported, not {type(pl).__name__} "
                + ("(reduce Partial grads before the step)" if pl.is_partial() else
                   "(_StridedShard comes from FSDP2 + tensor parallel sharding one tensor dim "
                   "twice)" if "Strided" in type(pl).__name__ else ""))
    return frozenset(dims)


def _reduction_group(mesh, dims):
    """The process group spanning `dims` of `mesh`: one mesh dim's group,
    or the default group when the dims cover a mesh that spans the world."""
    import torch.distributed as dist
    if len(dims) == 1:
        return mesh.get_group(next(iter(dims)))
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return None  # the default (world) group
    raise ValueError(
        f"fused_wd: grads sharded over mesh dims {sorted(dims)} of {mesh} need a process group "
        "spanning those dims, which fused_wd only finds for one dim or for a mesh that spans "
        "the whole world; this layout is not supported")


def global_norm(grads, norm_type, local_norm, real=lambda t: t):
    """The global norm_type-norm (2.0 or inf) of grads spread over ranks, as a
    float32 0-dim tensor on the first grad's device, with exactly one
    all-reduce. `grads` mixes DTensors (one mesh) and plain tensors (taken as
    replicated on every rank); `local_norm(entries, norm_type)` is the fused
    local pass, given one entry per grad: the tensor whose norm counts on
    this rank, or None for a grad this rank does not count; it returns a
    float32 0-dim tensor, or None when nothing counts. `real` maps a local
    tensor to the tensor whose norm counts (view_as_real of complex)."""
    import torch.distributed as dist

    mesh = None
    sharded = []
    for g in grads:
        if isinstance(g, DTensor):
            if mesh is None:
                mesh = g.device_mesh
            elif g.device_mesh != mesh:
                raise ValueError(
                    f"fused_wd: grads on different device meshes ({mesh} and {g.device_mesh}) "
                    "cannot share one all-reduce for the global norm; this is not supported")
            sharded.append(_sharded_dims(g))
        else:
            sharded.append(None)
    # mesh dims of size 1 need no reduction
    reduce_dims = frozenset(d for s in sharded if s for d in s if mesh.size(d) > 1)
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"fused_wd: this rank is not part of the grads' mesh {mesh}")
    inf = norm_type == math.inf
    group = _reduction_group(mesh, reduce_dims) if reduce_dims else None

    # The grads this rank counts. For a max, counting a replica again is
    # harmless; for a sum, a grad replicated along a reduced dim is counted
    # by the rank at coordinate 0 of that dim only.
    lead = {d: coord[d] == 0 for d in reduce_dims}
    entries = [real(local(g)) if inf or all(lead[d] for d in reduce_dims
                                             if dims is None or d not in dims) else None
               for g, dims in zip(grads, sharded)]

    device = local(grads[0]).device
    part = local_norm(entries, norm_type)
    if part is None:
        part = torch.zeros((), dtype=torch.float64, device=device)
    else:
        part = part.to(torch.float64)
    if not reduce_dims:  # every grad replicated: the local norm is the norm
        return part.float().to(device)

    comm = torch.device(mesh.device_type)
    if part.device.type != comm.type:
        part = part.to(comm, non_blocking=True)
    if inf:
        # MAX may drop a NaN (it compares); carry "some rank saw a NaN" as a
        # second value of the same all-reduce.
        nan = torch.isnan(part)
        buf = torch.stack([torch.where(nan, torch.zeros_like(part), part), nan.to(part.dtype)])
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        total = torch.where(buf[1] > 0, torch.full_like(buf[0], math.nan), buf[0])
    else:
        buf = part * part
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        total = buf.sqrt()
    # (back to the CPU, e.g. FSDP2 CPU offload on a GPU mesh: a blocking copy,
    # as the CPU kernels read it at once)
    return total.float().to(device, non_blocking=device.type != "cpu")
