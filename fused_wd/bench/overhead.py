"""``--preset overhead``: the host cost per tensor of ``opt.step()`` (issue 21).

Many tiny tensors (16 fp32 elements each, so memory traffic is negligible)
make the step's time that of its bookkeeping: Python, the op calls, the C++
checks, the kernel launches. For each tensor count, optimizer and grad
regime the implementations run interleaved, one step each per round, and
the median time of ``step()`` (clipping included where asked) divided by the
number of tensors is reported in microseconds.

Grad regimes:
- ``fresh``: new grad tensors before every step, as after
  ``zero_grad(set_to_none=True)`` and a backward pass (three pre-made sets
  are cycled, so every step sees other tensor objects; making them is not
  timed);
- ``kept``: the same grad tensors every step, as with
  ``zero_grad(set_to_none=False)``.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from . import report, sysload
from .bandwidth import sync
from .impls import IMPLS, Hyper

COUNTS = (100, 1000, 10000)
NUMEL = 16
# (label, optim, clip)
RUNS = (("AdamW", "adamw", False), ("AdamW + clip", "adamw", True), ("Adam", "adam", False),
        ("SGD momentum", "sgd", False))
REGIMES = ("fresh", "kept")
DEFAULT_IMPLS = ("fused_wd", "torch-fused")


def _grad_sets(count, device, sets):
    g = torch.Generator().manual_seed(1)
    return [[(0.01 * torch.randn(NUMEL, generator=g)).to(device) for _ in range(count)]
            for _ in range(sets)]


def measure(count, optim, clip, regime, names, device, rounds, warmup=3):
    """{impl: [seconds per step, one per round]} for one table cell."""
    hp = Hyper()
    g0 = torch.Generator().manual_seed(0)
    init = [(0.02 * torch.randn(NUMEL, generator=g0)).to(device) for _ in range(count)]
    sets = _grad_sets(count, device, 3 if regime == "fresh" else 1)
    runs = {}
    for n in names:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        _, step = IMPLS[n].make(params, optim, clip, hp)
        runs[n] = (params, step)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            params, step = runs[n]
            grads = sets[r % len(sets)]
            if regime == "fresh" or r == 0:
                for p, g in zip(params, grads):
                    p.grad = g.clone() if regime == "kept" else g
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def run(args, device, names, argv) -> int:
    counts = [int(c) for c in args.sizes] if args.sizes else list(COUNTS)
    runs = [r for r in RUNS if (args.optim is None or r[1] in args.optim)
            and (args.clip is None or {"on": [True], "off": [False], "both": [True, False]}[args.clip]
                 .count(r[2]))]
    names = [n for n in names if IMPLS[n].check(device.type, "adamw", torch.float32) is None]
    rounds = args.repeats if args.repeats is not None else 21
    env = report.environment(device, argv)
    snap = sysload.Snapshot()
    t_start = time.perf_counter()
    cells = []
    for count in counts:
        for label, optim, clip in runs:
            for regime in REGIMES:
                times = measure(count, optim, clip, regime, names, device, rounds)
                cell = dict(count=count, run=label, optim=optim, clip=clip, regime=regime,
                            us_per_tensor={n: 1e6 * statistics.median(ts) / count for n, ts in times.items()},
                            us_per_tensor_min={n: 1e6 * min(ts) / count for n, ts in times.items()})
                cells.append(cell)
                print(_row(cell, names), flush=True)
    res = dict(env=env, study="overhead", numel_per_tensor=NUMEL, rounds=rounds, impls=names,
               cells=cells, others_cpu=snap.others_share(), wall_s=time.perf_counter() - t_start)
    text = render(res)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"wrote {os.path.join(args.out, 'report.md')}, {os.path.join(args.out, 'results.json')}")
    return 0


def _row(cell, names):
    us = cell["us_per_tensor"]
    return (f"{cell['count']:6d} tensors  {cell['run']:13s} {cell['regime']:5s}  "
            + "  ".join(f"{n} {us[n]:.3f}" for n in names) + " us/tensor")


def render(res) -> str:
    env, names = res["env"], res["impls"]
    ratio = "fused_wd" in names and "torch-fused" in names
    lines = ["# fused_wd benchmark: host cost per tensor of opt.step()", "",
             f"Command: `{env['command']}`", "",
             f"- device: {env['device_name']} ({env['torch_threads']} threads), torch {env['torch']}",
             f"- fused_wd at {str(env.get('git_commit'))[:12]}"
             + (" (uncommitted changes)" if env.get("git_dirty") else ""),
             f"- date: {env['date']}",
             f"- {NUMEL} fp32 elements per tensor; median over {res['rounds']} interleaved rounds of one "
             "step each, after 3 warm-up steps; microseconds per tensor (step time / tensor count)",
             "- fresh: new grad tensors every step (zero_grad(set_to_none=True)); kept: the same grad "
             "tensors (set_to_none=False)"]
    if res.get("others_cpu") is not None:
        lines.append(f"- other processes used {res['others_cpu']:.0%} of the CPUs meanwhile")
    lines += ["", "| tensors | step | grads | " + " | ".join(f"{IMPLS[n].label} us" for n in names)
              + (" | torch fused / fused_wd |" if ratio else " |"),
              "|---:|:---|:---|" + "---:|" * len(names) + ("---:|" if ratio else "")]
    for c in res["cells"]:
        us = c["us_per_tensor"]
        row = f"| {c['count']} | {c['run']} | {c['regime']} | " + " | ".join(f"{us[n]:.3f}" for n in names)
        if ratio:
            row += f" | {us['torch-fused'] / us['fused_wd']:.1f}x"
        lines.append(row + " |")
    return "\n".join(lines) + "\n"
