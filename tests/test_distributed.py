"""Distributed training on real processes: 2 (and 4 for HSDP 2x2) gloo ranks
on the CPU, spawned on a free loopback port, bounded in time.

The ranks run the scenarios below (this file is also their entry point:
`python tests/test_distributed.py OUT_DIR SCENARIO...`) and save what they
saw; the tests compare that with single-process torch.optim +
clip_grad_norm_ on the same global batches, computed here.
"""
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # as a worker script
    sys.path.insert(0, ROOT)

import fused_wd  # noqa: E402

if __name__ != "__main__":
    pytestmark = pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo is not available")

STEPS = 4
GLOBAL_BATCH = 8
LAUNCH_TIMEOUT = 240  # s, for one launch of all the scenarios of a world size

# optimizer configs shared by the ranks and the single-process reference;
# max_norm is below the grad norm, so every step clips
CONFIGS = {
    "adamw_l2": dict(opt="AdamW", kw=dict(lr=1e-2, weight_decay=0.1), max_norm=0.05, norm_type=2.0),
    "adamw_inf": dict(opt="AdamW", kw=dict(lr=1e-2, weight_decay=0.1), max_norm=0.02,
                      norm_type=math.inf),
    "sgd": dict(opt="SGD", kw=dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
                max_norm=0.05, norm_type=2.0),
}


def make_model(seed=0):
    # Row counts 5, 9 and 1 shard unevenly over 2 and 4 ranks, and the last
    # layer leaves some ranks an empty local shard.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 9),
                               torch.nn.Tanh(), torch.nn.Linear(9, 1))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def make_opt(mod, cfg, params):
    return getattr(mod, cfg["opt"])(params, **cfg["kw"], **(
        dict(max_grad_norm=cfg["max_norm"], norm_type=cfg["norm_type"]) if mod is fused_wd else {}))


def reference_run(cfg, steps=STEPS):
    """Single process: torch.optim (for-loop) + clip_grad_norm_ on the global batches."""
    model = make_model()
    opt = make_opt(torch.optim, cfg, model.parameters())
    for group in opt.param_groups:
        group["foreach"] = False
    norms = []
    for s in range(steps):
        loss_of(model, *batch(s)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_norm"],
                                                    cfg["norm_type"]))
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()], torch.stack(norms)


# --------------------------------------------------------------- rank side

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
                "barrier", "all_reduce_coalesced", "all_gather_object", "gather", "scatter")


@contextlib.contextmanager
def counting_collectives():
    """Counts the torch.distributed collectives called inside the block."""
    calls, saved = [], []
    for mod in (dist, dist.distributed_c10d):
        for name in _COLLECTIVES:
            f = getattr(mod, name, None)
            if f is None:
                continue
            saved.append((mod, name, f))

            def wrapper(*a, _f=f, _name=name, **k):
                calls.append(_name)
                return _f(*a, **k)

            setattr(mod, name, wrapper)
    try:
        yield calls
    finally:
        for mod, name, f in saved:
            setattr(mod, name, f)


def _shard_rows(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _fsdp_model(mesh, seed=0):
    from torch.distributed.fsdp import fully_shard
    model = make_model(seed).to(mesh.device_type)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, opt, steps, rank, world, device="cpu"):
    norms, counts = [], []
    for s in steps:
        x, y = (t.to(device) for t in batch(s))
        loss_of(model, _shard_rows(x, rank, world), _shard_rows(y, rank, world)).backward()
        with counting_collectives() as calls:
            opt.step()
        counts.append(list(calls))
        norms.append(opt.last_grad_norm.clone())
        opt.zero_grad()
    return torch.stack(norms), counts


def _full(params):
    from torch.distributed.tensor import DTensor
    return [(p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()).cpu()
            for p in params]


def _fsdp_run(rank, world, cfg_name, mesh_shape=None, dim_names=None, device="cpu"):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device, mesh_shape or (world,), mesh_dim_names=dim_names)
    model = _fsdp_model(mesh)
    cfg = CONFIGS[cfg_name]
    opt = make_opt(fused_wd, cfg, model.parameters())
    norms, counts = _train(model, opt, range(STEPS), rank, world, device)
    placements = [tuple(str(pl) for pl in p.placements) for p in model.parameters()]
    state = opt.state[next(iter(model.parameters()))]
    state_types = sorted({type(v).__name__ for k, v in state.items() if k != "step"})
    return dict(params=_full(model.parameters()), norms=norms.cpu(), counts=counts,
                placements=placements, state_types=state_types,
                devices=sorted({p.device.type for p in model.parameters()}))


def scenario_fsdp_adamw_l2(rank, world, out):
    return _fsdp_run(rank, world, "adamw_l2")


def scenario_fsdp_adamw_inf(rank, world, out):
    return _fsdp_run(rank, world, "adamw_inf")


def scenario_fsdp_sgd(rank, world, out):
    return _fsdp_run(rank, world, "sgd")


def scenario_fsdp_cuda_adamw_l2(rank, world, out):
    return _fsdp_run(rank, world, "adamw_l2", device="cuda")


def scenario_fsdp_cuda_sgd(rank, world, out):
    return _fsdp_run(rank, world, "sgd", device="cuda")


def scenario_hsdp_2x1(rank, world, out):
    return _fsdp_run(rank, world, "adamw_l2", (2, 1), ("replicate", "shard"))


def scenario_hsdp_1x2(rank, world, out):
    return _fsdp_run(rank, world, "adamw_l2", (1, 2), ("replicate", "shard"))


def scenario_hsdp_2x2(rank, world, out):
    return _fsdp_run(rank, world, "adamw_l2", (2, 2), ("replicate", "shard"))


def scenario_clip_grad_norm(rank, world, out):
    """fused_wd.clip_grad_norm_ on FSDP2 grads: the global norm and clipped
    grads of the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    model = _fsdp_model(init_device_mesh("cpu", (world,)))
    x, y = batch(0)
    loss_of(model, _shard_rows(x, rank, world), _shard_rows(y, rank, world)).backward()
    with counting_collectives() as calls:
        norm = fused_wd.clip_grad_norm_(model.parameters(), 0.05)
    return dict(norm=norm, grads=_full([p.grad for p in model.parameters()]), counts=list(calls))


def scenario_ddp(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(make_model())
    opt = make_opt(fused_wd, CONFIGS["adamw_l2"], model.parameters())
    norms, counts = _train(model, opt, range(STEPS), rank, world)
    return dict(params=_full(model.parameters()), norms=norms, counts=counts)


def _nib_pair(rank, world, build):
    """The same training with norm_in_backward on and off: each one's params,
    norms and norm_stats. Every param gets a hook, small as they are (an empty
    local shard too)."""
    slots = fused_wd._norm_slots
    default, slots._HOOK_READ_MIN = slots._HOOK_READ_MIN, 0
    try:
        out = {}
        for nib in (True, False):
            model = build()
            opt = fused_wd.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=0.05,
                                 norm_in_backward=nib)
            norms, _ = _train(model, opt, range(STEPS), rank, world)
            out[nib] = dict(params=_full(model.parameters()), norms=norms, stats=opt.norm_stats)
        return out
    finally:
        slots._HOOK_READ_MIN = default


def scenario_nib_fsdp(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    return _nib_pair(rank, world, lambda: _fsdp_model(mesh))


def scenario_nib_ddp(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel
    return _nib_pair(rank, world, lambda: DistributedDataParallel(make_model()))


def _mixed(mesh_shape, placements):
    """One clipped step over params of several layouts on one mesh (None: a
    plain, replicated tensor): each grad must be counted exactly once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    mesh = init_device_mesh("cpu", mesh_shape)
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3), (2, 1), (4,), (3, 2), (6, 4)][:len(placements)]
    full_p = [torch.randn(s, generator=g) for s in shapes]
    full_g = [torch.randn(s, generator=g) for s in shapes]
    res = dict(full_p=full_p, full_g=full_g)
    for name, norm_type in (("l2", 2.0), ("inf", math.inf)):
        for impl in (fused_wd, fused_wd.reference):
            params = []
            for t, gt, pl in zip(full_p, full_g, placements):
                if pl is None:
                    p = torch.nn.Parameter(t.clone())
                    p.grad = gt.clone()
                else:
                    # (distribute_tensor may keep the source's storage: clone)
                    p = torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl))
                    p.grad = distribute_tensor(gt.clone(), mesh, pl)
                params.append(p)
            opt = impl.AdamW(params, lr=0.1, max_grad_norm=0.5, norm_type=norm_type)
            with counting_collectives() as calls:
                opt.step()
            key = f"{name}_{impl.__name__.split('.')[-1]}"
            res[key] = dict(norm=opt.last_grad_norm, params=_full(params), counts=list(calls))
    return res


def scenario_mixed(rank, world, out):
    """Shard(0), Shard(1) with an empty local shard, Replicate() and a plain tensor."""
    from torch.distributed.tensor import Replicate, Shard
    return _mixed((world,), [[Shard(0)], [Shard(1)], [Replicate()], None])


def scenario_mixed_2d(rank, world, out):
    """On a 2x2 mesh: sharded over both dims (the all-reduce spans the world),
    over one, over none, and a plain tensor."""
    from torch.distributed.tensor import Replicate, Shard
    return _mixed((2, 2), [[Shard(0), Shard(1)], [Replicate(), Shard(0)],
                                  [Shard(0), Replicate()], None, [Replicate(), Replicate()]])


def scenario_nonfinite(rank, world, out):
    """A NaN (or inf) in one rank's shard: every rank sees it in the norm and
    skips the step (MAX alone could drop a NaN)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for bad in ("nan", "inf"):
        for name, norm_type in (("l2", 2.0), ("inf", math.inf)):
            full = torch.arange(8.0).reshape(4, 2)
            grad = torch.ones(4, 2)
            grad[-1, -1] = float(bad)  # in the last rank's shard
            p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
            p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            opt = fused_wd.AdamW([p], lr=0.1, max_grad_norm=1.0, norm_type=norm_type)
            opt.step()
            res[f"{bad}_{name}"] = (opt.last_grad_norm.item(), torch.equal(p.full_tensor(), full))
    return res


def scenario_dcp(rank, world, out):
    """Save model and optimizer with DCP after 2 steps, keep going; then a
    fresh model and optimizer load it and take the same steps: bitwise equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh("cpu", (world,))
    cfg = CONFIGS["adamw_l2"]
    ckpt = os.path.join(out, "ckpt")
    res = {}

    def local_state(model, opt):
        ps = [p.to_local().clone() for p in model.parameters()]
        st = [{k: (v.to_local() if isinstance(v, DTensor) else v).clone()
               for k, v in opt.state[p].items()} for p in model.parameters()]
        return ps, st

    model = _fsdp_model(mesh)
    opt = make_opt(fused_wd, cfg, model.parameters())
    _train(model, opt, range(2), rank, world)
    osd = get_optimizer_state_dict(model, opt)
    res["saved_state_types"] = sorted({type(v).__name__ for s in osd["state"].values()
                                       for v in s.values()})
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=ckpt)
    norms_a, _ = _train(model, opt, range(2, STEPS), rank, world)
    params_a, state_a = local_state(model, opt)

    model2 = _fsdp_model(mesh, seed=1)
    opt2 = make_opt(fused_wd, cfg, model2.parameters())
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    norms_b, _ = _train(model2, opt2, range(2, STEPS), rank, world)
    params_b, state_b = local_state(model2, opt2)

    res["params_equal"] = all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    res["state_equal"] = all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
                             for sa, sb in zip(state_a, state_b))
    res["norms_equal"] = torch.equal(norms_a, norms_b)
    res["steps"] = [float(s["step"]) for s in state_b]
    return res


def scenario_refused(rank, world, out):
    """Unsupported layouts raise a clear error on every rank, before any
    collective (so nothing hangs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("a",))
    other = init_device_mesh("cpu", (world,), mesh_dim_names=("b",))
    res = {}

    def attempt(name, params, **kw):
        opt = fused_wd.AdamW(params, lr=0.1, **kw)
        try:
            with counting_collectives() as calls:
                opt.step()
        except (ValueError, RuntimeError) as e:
            res[name] = (type(e).__name__, str(e), list(calls))
        else:
            res[name] = None

    def param(local, placements, m=mesh):
        p = torch.nn.Parameter(DTensor.from_local(local, m, placements, run_check=False))
        p.grad = DTensor.from_local(torch.ones_like(local), m, placements, run_check=False)
        return p

    attempt("partial", [param(torch.ones(2, 3), [Partial()])], max_grad_norm=1.0)
    attempt("partial_update", [param(torch.ones(2, 3), [Partial()])])
    attempt("strided", [param(torch.ones(2, 3), [_StridedShard(0, split_factor=2)])],
            max_grad_norm=1.0)
    attempt("two_meshes", [param(torch.ones(2, 3), [Shard(0)]),
                           param(torch.ones(2, 3), [Shard(0)], other)], max_grad_norm=1.0)
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
    attempt("grad_layout", [p])
    attempt("automatic", [param(torch.ones(2, 3), [Shard(0)])], max_grad_norm=1.0,
            weight_decay_mode="adaptive")
    return res


SCENARIOS = {k[len("scenario_"):]: v for k, v in globals().items() if k.startswith("scenario_")}


def _worker(out, names):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    backend = os.environ.get("FUSED_WD_TEST_BACKEND", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    try:
        for name in names:
            try:
                res = SCENARIOS[name](rank, world, out)
            except BaseException:
                with open(os.path.join(out, f"{name}.rank{rank}.err"), "w") as f:
                    f.write(traceback.format_exc())
                raise
            torch.save(res, os.path.join(out, f"{name}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
    sys.exit(0)


# --------------------------------------------------------------- test side

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, names, out, timeout=LAUNCH_TIMEOUT, backend="gloo"):
    """Runs the scenarios on `world` ranks of `backend` (subprocesses, each
    its own session so that a timeout kills it and its children); returns
    (seconds, {rank: log})."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               FUSED_WD_TEST_BACKEND=backend,
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs, logs = [], []
    start = time.monotonic()
    try:
        for r in range(world):
            log = open(os.path.join(out, f"rank{r}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), out, *names],
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            p.wait(timeout=max(1.0, start + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = {}
    for r, log in enumerate(logs):
        log.seek(0)
        text[r] = log.read()
        log.close()
    return time.monotonic() - start, text


class World:
    def __init__(self, world, names, tmp_path_factory, backend="gloo"):
        self.world = world
        self.out = str(tmp_path_factory.mktemp(f"world{world}{backend}"))
        self.seconds, self.logs = launch(world, names, self.out, backend=backend)

    def result(self, name):
        """Every rank's result of a scenario; fails with the ranks' logs."""
        res = []
        for r in range(self.world):
            path = os.path.join(self.out, f"{name}.rank{r}.pt")
            if not os.path.exists(path):
                err = os.path.join(self.out, f"{name}.rank{r}.err")
                why = open(err).read() if os.path.exists(err) else "\n".join(
                    f"--- rank {k} (launch took {self.seconds:.0f} s) ---\n{v[-3000:]}"
                    for k, v in self.logs.items())
                pytest.fail(f"scenario {name!r} gave no result on rank {r}:\n{why}")
            res.append(torch.load(path, weights_only=False))
        return res


WORLD2 = ["clip_grad_norm", "fsdp_adamw_l2", "fsdp_adamw_inf", "fsdp_sgd", "ddp", "mixed", "nonfinite",
          "hsdp_2x1", "hsdp_1x2", "dcp", "refused", "nib_fsdp", "nib_ddp"]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return World(2, WORLD2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return World(4, ["hsdp_2x2", "mixed_2d"], tmp_path_factory)


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def _check_against_reference(res, cfg_name, collectives):
    ref_params, ref_norms = reference_run(CONFIGS[cfg_name])
    assert (ref_norms > CONFIGS[cfg_name]["max_norm"]).all()  # every step clipped
    for r in res:
        torch.testing.assert_close(r["norms"], ref_norms, rtol=1e-6, atol=0)
        _close(r["params"], ref_params)
        assert r["counts"] == [collectives] * STEPS, r["counts"]


@pytest.mark.parametrize("cfg_name", ["adamw_l2", "adamw_inf", "sgd"])
def test_fsdp2_matches_torch_optim_and_clip_grad_norm(world2, cfg_name):
    res = world2.result(f"fsdp_{cfg_name}")
    # one all-reduce per step for the clip, nothing else
    _check_against_reference(res, cfg_name, ["all_reduce"])
    assert res[0]["placements"] == [("S(0)",)] * 6
    assert res[0]["state_types"] == ["DTensor"]


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="needs a CUDA device and torch.distributed with nccl")
@pytest.mark.parametrize("cfg_name", ["adamw_l2", "sgd"])
def test_fsdp2_on_one_cuda_rank_with_nccl(cfg_name, tmp_path_factory):
    """FSDP2 over one nccl rank: the kernels step the CUDA DTensor shards and
    the clip's global norm goes through nccl; the params match torch.optim +
    clip_grad_norm_ on the CPU."""
    world = World(1, [f"fsdp_cuda_{cfg_name}"], tmp_path_factory, backend="nccl")
    (res,) = world.result(f"fsdp_cuda_{cfg_name}")
    assert res["devices"] == ["cuda"] and res["state_types"] == ["DTensor"]
    ref_params, ref_norms = reference_run(CONFIGS[cfg_name])
    torch.testing.assert_close(res["norms"], ref_norms, rtol=1e-5, atol=0)
    _close(res["params"], ref_params)
    # at most the clip's one all-reduce per step
    assert all(c in ([], ["all_reduce"]) for c in res["counts"]), res["counts"]


def test_clip_grad_norm_on_fsdp2_grads(world2):
    model = make_model()
    loss_of(model, *batch(0)).backward()
    ref = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    for r in world2.result("clip_grad_norm"):
        torch.testing.assert_close(r["norm"], ref, rtol=1e-6, atol=0)
        _close(r["grads"], [p.grad for p in model.parameters()])
        assert r["counts"] == ["all_reduce"]


def test_ddp_matches_with_no_collective_in_the_step(world2):
    _check_against_reference(world2.result("ddp"), "adamw_l2", [])


def _same_bits(a, b):
    assert torch.equal(a["norms"], b["norms"])
    assert len(a["params"]) == len(b["params"])
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)


def test_norm_in_backward_on_fsdp2_uses_the_hooks_and_matches_bitwise(world2):
    """FSDP2 runs the hooks of its sharded params after the reduce-scatter:
    the parts come from backward (local shards), the step's all-reduce
    remains."""
    for r in world2.result("nib_fsdp"):
        _same_bits(r[True], r[False])
        assert r[True]["stats"] == {"from_backward": 6 * STEPS, "at_step": 0, "small": 0}


def test_norm_in_backward_under_ddp_falls_back_and_matches_bitwise(world2):
    """DDP averages the grads after the hooks ran: the hooks leave them alone
    and the step computes every part."""
    for r in world2.result("nib_ddp"):
        _same_bits(r[True], r[False])
        assert r[True]["stats"] == {"from_backward": 0, "at_step": 6 * STEPS, "small": 0}


@pytest.mark.parametrize("shape", ["2x1", "1x2"])
def test_hsdp_2d_mesh_on_2_ranks(world2, shape):
    res = world2.result(f"hsdp_{shape}")
    assert res[0]["placements"] == [("R", "S(0)")] * 6
    # a shard dim of size 1 needs no collective; the replicate dim is never reduced
    _check_against_reference(res, "adamw_l2", [] if shape == "2x1" else ["all_reduce"])


def test_hsdp_2x2_on_4_ranks(world4):
    res = world4.result("hsdp_2x2")
    assert res[0]["placements"] == [("R", "S(0)")] * 6
    _check_against_reference(res, "adamw_l2", ["all_reduce"])


@pytest.mark.parametrize("world", [2, 4])
def test_mixed_placements_count_each_grad_once(world, request):
    if world == 2:
        res = request.getfixturevalue("world2").result("mixed")
    else:
        res = request.getfixturevalue("world4").result("mixed_2d")
    full_p, full_g = res[0]["full_p"], res[0]["full_g"]
    for name, norm_type in (("l2", 2.0), ("inf", math.inf)):
        expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full_g]), norm_type)
        params = [torch.nn.Parameter(t.clone()) for t in full_p]
        for p, g in zip(params, full_g):
            p.grad = g.clone()
        opt = fused_wd.AdamW(params, lr=0.1, max_grad_norm=0.5, norm_type=norm_type)
        opt.step()
        for r in res:
            for impl in ("fused_wd", "reference"):
                got = r[f"{name}_{impl}"]
                torch.testing.assert_close(got["norm"], expected_norm, rtol=1e-6, atol=0)
                _close(got["params"], [p.detach() for p in params])
                assert got["counts"] == ["all_reduce"]
            if name == "inf":  # a max is exact, whatever the sharding
                assert torch.equal(r["inf_fused_wd"]["norm"], opt.last_grad_norm)


def test_nonfinite_shard_skips_the_step_on_every_rank(world2):
    for r in world2.result("nonfinite"):
        for key, (norm, unchanged) in r.items():
            assert unchanged, key
            if key.startswith("nan"):
                assert math.isnan(norm), (key, norm)
            else:
                assert norm == math.inf, (key, norm)


def test_dcp_round_trip_resumes_bitwise(world2):
    for r in world2.result("dcp"):
        assert r["saved_state_types"] == ["DTensor", "Tensor"]  # sharded states, plain step
        assert r["params_equal"] and r["state_equal"] and r["norms_equal"]
        assert r["steps"] == [float(STEPS)] * 6


@pytest.mark.parametrize("case,error,words", [
    ("partial", "ValueError", "Partial"),  # by the norm
    ("partial_update", "RuntimeError", "Partial"),  # by the update, when not clipping
    ("strided", "ValueError", "_StridedShard"),
    ("two_meshes", "ValueError", "different device meshes"),
    ("grad_layout", "RuntimeError", "laid out like its parameter"),
    ("automatic", "RuntimeError", "reduction across ranks"),  # SWD/AWD statistics are local
])
def test_unsupported_layouts_are_refused(world2, case, error, words):
    for r in world2.result("refused"):
        assert r[case] is not None, f"{case} was not refused"
        kind, msg, calls = r[case]
        assert kind == error and words in msg, msg
        assert calls == [], calls  # refused before any collective


def test_plain_tensors_take_the_local_path(monkeypatch):
    """Without DTensors (single process, DDP) the step never reaches the
    distributed norm and calls no collective."""
    def boom(*a, **k):
        raise AssertionError("the distributed norm was used for plain tensors")

    monkeypatch.setattr(fused_wd.distributed, "global_norm", boom)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = fused_wd.AdamW([p], max_grad_norm=1.0)
    with counting_collectives() as calls:
        opt.step()
    assert calls == [] and opt.last_grad_norm.item() == pytest.approx(3 ** 0.5)
