"""Run one benchmark case: every implementation on the same parameters, A/B interleaved.

A case is (parameter shapes, optimizer, clip on/off, dtype, device). Every
implementation gets its own copy of the same initial parameters and
gradients, then, in one process:

1. ``warmup`` steps each (the first one allocates the optimizer state);
2. one step under the memory probe (extra peak memory), and on GPU one step
   under torch.profiler (kernel launches);
3. ``repeats`` rounds; in each round every implementation runs ``iters``
   steps back to back and is timed (device synchronized before and after),
   and the stream-bandwidth probe runs once; the order rotates every round;
4. the parameters of every implementation are compared with the oracle
   (``fused_wd.reference``, else torch's for-loop), which ran the same
   number of steps on the same inputs.

When all copies do not fit in the memory budget, implementations run one
after the other instead (``mode: sequential``), which the report says.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

from . import memory
from .bandwidth import StreamProbe, floor_bytes_per_param, sync
from .impls import BASELINES, IMPLS, ORACLE_ORDER, Hyper
from .presets import fmt_count, numel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Max |p - p_oracle| over all elements, divided by the largest change the oracle
# made to any parameter. Legitimate differences (summation order, fused
# multiply-add, in-place clipping of p.grad by torch) stay orders of magnitude
# below these; a wrong formula (bias correction, decay mode, clip factor) is
# far above them. Half-precision storage rounds every step, hence the looser value.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}
HALF_MATH_TOLERANCE = 1.0  # torch's for-loop/foreach do their arithmetic in bf16/fp16


@dataclass
class Case:
    preset: str
    shapes: list
    optim: str
    clip: bool
    dtype: torch.dtype
    device: torch.device
    target: int | None = None

    @property
    def nparams(self) -> int:
        return numel(self.shapes)

    @property
    def title(self) -> str:
        return (f"{self.optim}{' + clip' if self.clip else ''}, {DTYPE_NAMES.get(self.dtype, self.dtype)}, "
                f"{self.preset} shapes, {fmt_count(self.nparams)} params in {len(self.shapes)} tensors")


@dataclass
class RunOpts:
    repeats: int = 7
    warmup: int = 3
    min_repeat_s: float = 0.02   # each timed repeat runs iters steps to last at least this long
    max_iters: int = 50
    fixed_iters: int | None = None  # steps per timed round; None = calibrate from the warm-up
    check: bool = True
    seed: int = 0
    mem_fraction: float = 0.6    # of the free RAM / GPU memory at the start of the case


@dataclass
class Contender:
    name: str
    timed: bool
    params: list = field(default_factory=list)
    opt: object = None
    step: object = None
    times: list = field(default_factory=list)
    warm_s: float = math.inf
    extra_peak: int | None = None
    launches: int | None = None
    error: str | None = None
    steps_done: int = 0
    check: dict | None = None


def _err_text(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:240]


class CaseRunner:
    def __init__(self, case: Case, names: list, hp: Hyper, opts: RunOpts, probe: StreamProbe | None,
                 progress=None, verbose=False):
        self.case = case
        self.names = names
        self.opts = opts
        self.probe = probe
        self.progress = progress
        self.verbose = verbose
        self.dev = case.device
        self.hp_base = hp
        self.iters: int | None = None
        self.probe_gbps: list = []
        self.rows: dict = {}
        self.oracle_params = None
        self.oracle_name: str | None = None

    # ------------------------------------------------------------------ setup
    def _masters(self):
        c, dev = self.case, self.dev
        gen = torch.Generator(device=dev)
        gen.manual_seed(self.opts.seed)
        p0, g0 = [], []
        for s in c.shapes:
            p0.append(torch.randn(s, generator=gen, device=dev, dtype=torch.float32).mul_(0.02).to(c.dtype))
        for s in c.shapes:
            g0.append(torch.randn(s, generator=gen, device=dev, dtype=torch.float32).mul_(0.01).to(c.dtype))
        sq = sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in g0)
        return p0, g0, math.sqrt(sq)

    def _build(self, name: str, timed: bool) -> Contender:
        c = Contender(name=name, timed=timed)
        try:
            params = []
            for p, g in zip(self.p0, self.g0):
                q = torch.nn.Parameter(p.clone())
                q.grad = g.clone()
                params.append(q)
            c.params = params
            c.opt, c.step = IMPLS[name].make(params, self.case.optim, self.case.clip, self.hp)
        except Exception as e:  # noqa: BLE001
            c.error = "construction failed: " + _err_text(e)
            self._debug(e)
            self._drop(c)
        return c

    def _debug(self, e):
        if self.verbose:
            traceback.print_exception(type(e), e, e.__traceback__)

    def _drop(self, c: Contender, keep_params: bool = False):
        c.opt = None
        c.step = None
        if not keep_params:
            c.params = []
        else:
            for p in c.params:
                p.grad = None

    def _call(self, c: Contender, k: int = 1) -> bool:
        try:
            for _ in range(k):
                c.step()
                c.steps_done += 1
            return True
        except Exception as e:  # noqa: BLE001
            c.error = f"step {c.steps_done + 1} failed: " + _err_text(e)
            self._debug(e)
            self._drop(c)
            return False

    # ------------------------------------------------------------------- run
    def run(self) -> dict:
        case, opts, dev = self.case, self.opts, self.dev
        es = torch.empty((), dtype=case.dtype).element_size()
        n = case.nparams
        usable = []
        for name in self.names:
            why = IMPLS[name].check(dev.type, case.optim, case.dtype)
            if why:
                self.rows[name] = {"status": "unavailable", "note": why}
            else:
                usable.append(name)
        if opts.check:
            for o in ORACLE_ORDER:
                if IMPLS[o].check(dev.type, case.optim, case.dtype) is None:
                    self.oracle_name = o
                    break

        # memory plan
        n_state = 1 if case.optim == "sgd" else 2
        persist = n * es * (2 + n_state)
        temps = 3 * n * es  # the largest temporaries one step may need (foreach lists)
        masters = 2 * n * es
        members = list(usable)
        if self.oracle_name and self.oracle_name not in members:
            members = [self.oracle_name] + members
        budget = int(memory.device_free_bytes(dev) * opts.mem_fraction)
        need_inter = masters + len(members) * persist + temps
        need_seq = masters + persist + temps + (n * es if self.oracle_name else 0)
        mode = "interleaved"
        if need_inter > budget:
            mode = "sequential"
        result = self._case_header(es, mode)
        if not members:
            result["skipped"] = "no implementation available"
            result["impls"] = self.rows
            return result
        if need_seq > budget:
            result["skipped"] = (f"needs about {need_seq / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB "
                                 f"({opts.mem_fraction:.0%} of free memory); use --params to scale it down")
            result["impls"] = self.rows
            for name in usable:
                self.rows[name] = {"status": "skipped", "note": "not enough memory"}
            return result

        self.p0, self.g0, gnorm = self._masters()
        self.hp = dataclasses.replace(self.hp_base, max_norm=0.5 * gnorm)
        result["max_grad_norm"] = self.hp.max_norm
        result["initial_grad_norm"] = gnorm

        if mode == "interleaved":
            groups = [[(m, m in usable) for m in members]]
        else:
            first = [(self.oracle_name, self.oracle_name in usable)] if self.oracle_name else []
            groups = [first] if first else []
            groups += [[(m, True)] for m in usable if m != self.oracle_name]

        if len(groups) > 1 and self.progress is not None:
            self.progress.add_total((len(groups) - 1) * (1 + opts.repeats))
        contenders: dict[str, Contender] = {}
        for group in groups:
            live = self._run_group(group)
            for c in live:
                contenders[c.name] = c
                if c.name == self.oracle_name:
                    self.oracle_params = c.params if c.error is None else None
                    if self.oracle_params is None:
                        self.oracle_name = None
                    else:
                        self._drop(c, keep_params=True)  # its state is no longer needed
            for c in live:
                if c.name != self.oracle_name:
                    self._check(c)
                    self._drop(c)  # frees params, grads and state (sequential mode needs it)
            gc.collect()
        for c in contenders.values():
            if c.name == self.oracle_name:
                self._check(c)  # itself: error 0, states that the oracle ran
        self.oracle_params = None
        for c in contenders.values():
            self._drop(c)

        result["iters"] = self.iters
        result["oracle"] = self.oracle_name
        result["bw_probe_gbps"] = statistics.median(self.probe_gbps) if self.probe_gbps else None
        result["bw_probe_samples"] = self.probe_gbps
        self._fill_rows(contenders, result)
        result["impls"] = {name: self.rows[name] for name in self.names if name in self.rows}
        del self.p0, self.g0
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return result

    def _case_header(self, es: int, mode: str) -> dict:
        c = self.case
        return {
            "title": c.title, "preset": c.preset, "target_params": c.target, "nparams": c.nparams,
            "ntensors": len(c.shapes), "optim": c.optim, "clip": c.clip,
            "dtype": DTYPE_NAMES.get(c.dtype, str(c.dtype)), "device": str(c.device),
            "bytes_per_param": floor_bytes_per_param(c.optim, c.clip, es), "mode": mode,
            "repeats": self.opts.repeats, "warmup": self.opts.warmup,
            "lr": self.hp_base.lr(c.optim), "weight_decay": self.hp_base.weight_decay,
            "momentum": self.hp_base.momentum if c.optim == "sgd" else None,
        }

    def _progress(self, desc: str = "", k: int = 0):
        if self.progress is None:
            return
        if desc:
            self.progress.set(desc)
        if k:
            self.progress.update(k)

    def _run_group(self, group) -> list:
        opts, dev = self.opts, self.dev
        label = f"{self.case.optim}{'+clip' if self.case.clip else ''} {DTYPE_NAMES.get(self.case.dtype)} " \
                f"{fmt_count(self.case.nparams)}"
        live = []
        for name, timed in group:
            self._progress(f"{label}: build + warm up {name}")
            c = self._build(name, timed)
            live.append(c)
            if c.error:
                continue
            for _ in range(opts.warmup):
                sync(dev)
                t0 = time.perf_counter()
                if not self._call(c):
                    break
                sync(dev)
                c.warm_s = time.perf_counter() - t0
            if c.error:
                continue
            # one step under the memory probe, one under the profiler (GPU), same count for all
            try:
                c.extra_peak = memory.extra_peak_bytes(c.step, dev)
                c.steps_done += 1
                if dev.type == "cuda":
                    c.launches = memory.count_launches(c.step, dev)
                    c.steps_done += 1
            except Exception as e:  # noqa: BLE001
                c.error = f"step {c.steps_done + 1} failed: " + _err_text(e)
                self._drop(c)
        self._progress(k=1)
        running = [c for c in live if c.error is None]
        if self.iters is None and opts.fixed_iters:
            self.iters = max(1, int(opts.fixed_iters))
        if self.iters is None:
            fastest = min((c.warm_s for c in running), default=opts.min_repeat_s)
            fastest = max(fastest, 1e-7)
            self.iters = int(max(1, min(opts.max_iters, math.ceil(opts.min_repeat_s / fastest))))
        iters = self.iters
        probe_slot = 0
        for r in range(opts.repeats):
            self._progress(f"{label}: round {r + 1}/{opts.repeats}")
            running = [c for c in live if c.error is None]
            if not running:
                break
            k = r % len(running)
            order = running[k:] + running[:k]
            slot = probe_slot % (len(order) + 1)
            probe_slot += 1
            for i, c in enumerate(order + [None]):
                if i == slot and self.probe is not None:
                    self.probe_gbps.append(self.probe.run_once())
                if c is None:
                    continue
                sync(dev)
                t0 = time.perf_counter()
                ok = self._call(c, iters)
                sync(dev)
                if ok:
                    c.times.append((time.perf_counter() - t0) / iters)
            self._progress(k=1)
        sync(dev)
        return live

    # --------------------------------------------------------------- results
    def _check(self, c: Contender):
        if c.error is not None or self.oracle_params is None or not c.params:
            return
        max_diff = 0.0
        max_move = 0.0
        finite = True
        with torch.no_grad():
            for p, o, q0 in zip(c.params, self.oracle_params, self.p0):
                pf, of = p.detach().float(), o.detach().float()
                d = (pf - of).abs().max().item() if p.numel() else 0.0
                if not math.isfinite(d) or not torch.isfinite(pf).all():
                    finite = False
                max_diff = max(max_diff, d if math.isfinite(d) else math.inf)
                if o.numel():
                    max_move = max(max_move, (of - q0.float()).abs().max().item())
        err = max_diff / max_move if max_move > 0 else (0.0 if max_diff == 0 else math.inf)
        tol = TOLERANCE.get(self.case.dtype, 1e-3)
        if self.case.dtype in (torch.bfloat16, torch.float16) and IMPLS[c.name].half_math:
            tol = HALF_MATH_TOLERANCE
        c.check = {"max_abs_diff": max_diff, "max_update": max_move, "rel_err": err, "tol": tol,
                   "ok": bool(finite and err <= tol), "oracle": self.oracle_name,
                   "steps": c.steps_done}

    def _fill_rows(self, contenders: dict, result: dict):
        bpp = result["bytes_per_param"]
        n = result["nparams"]
        bw = result["bw_probe_gbps"]
        medians = {}
        for name, c in contenders.items():
            if not c.timed:
                continue
            row = {"status": "ok" if c.error is None else "failed"}
            if c.error:
                row["note"] = c.error
            if c.times:
                med = statistics.median(c.times)
                medians[name] = med
                row.update(times_s=c.times, median_s=med, min_s=min(c.times), max_s=max(c.times),
                           gbps=bpp * n / med / 1e9)
                if bw:
                    row["pct_bw"] = 100.0 * row["gbps"] / bw
            row["extra_peak_bytes"] = c.extra_peak
            row["launches"] = c.launches
            row["steps"] = c.steps_done
            if c.check is not None:
                row["check"] = c.check
            self.rows[name] = row
        for name, med in medians.items():
            self.rows[name]["speedup"] = {b: medians[b] / med for b in medians if b != name}
        result["baselines"] = [b for b in BASELINES if b in medians]
        if bw:
            result["floor_s"] = bpp * n / (bw * 1e9)


def run_case(case: Case, names, hp: Hyper, opts: RunOpts, probe, progress=None, verbose=False) -> dict:
    return CaseRunner(case, names, hp, opts, probe, progress, verbose).run()
