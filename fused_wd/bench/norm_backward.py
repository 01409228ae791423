"""The clipped step with the global norm gathered in backward
(norm_in_backward=True) against the unclipped step, side by side in one
process:

    python -m fused_wd.bench.norm_backward [--preset cpu-50m] [--dtype fp32,bf16]

Every contender steps its own copy of the same params (a preset's shapes)
after the same backward: `torch.autograd.backward(params, grads)` with fixed
grads, so that autograd runs each param's AccumulateGrad and its hooks as in
training, and backward itself is as cheap as a backward can be (a copy into
.grad). Per round and contender: zero_grad(set_to_none=True), backward
(timed), step (timed, clipping included). Rounds are interleaved and the
order rotates. Each of --trials trials starts from fresh copies of every
contender, since where a copy's memory lands moves its step by a few percent
for as long as the copy lives. Reported: median times, and the median over
all rounds of each one's ratio to the unclipped fused_wd AdamW of the same
round (and that median per trial). With --twin a second unclipped copy runs
too, and the reference of a round is the mean of the two copies' times:
their luck of placement averages, and the two ratios to it show the noise
floor between contenders that should be alike (on a 2-core VM, a few
percent for the 50M-param set).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from . import e2e
from .bandwidth import sync
from .presets import get_shapes, parse_count
from .report import e2e_table, environment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _contenders(max_norm, twin=False):
    import fused_wd

    def fw(**kw):
        def make(params):
            opt = fused_wd.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
            return opt, opt.step
        return make

    def torch_fused(params):
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
        return opt, step

    return {
        "fused_wd, no clip": fw(),
        **({"fused_wd, no clip (a second copy: the noise floor)": fw()} if twin else {}),
        "fused_wd + clip (norm at the step)": fw(max_grad_norm=max_norm),
        "fused_wd + clip, norm_in_backward=True": fw(max_grad_norm=max_norm, norm_in_backward=True),
        "torch fused + clip_grad_norm_": torch_fused,
    }


def keep_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse (no mmap for large
    blocks, no trimming of the heap), so that after the warmup every
    contender's backward allocates its grads from memory it has used before,
    as a long training run does. Left alone, large blocks are mmapped and
    given back on free, and a backward's time depends on whether the
    contender before it left reusable memory (a third faster after torch's
    step here): the backward column would compare allocators, not hooks.
    Elsewhere than glibc, nothing. Returns whether it was set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def run(shapes, dtype, device, repeats, warmup, seed=0, twin=False, trials=1):
    """Per trial: fresh copies of every contender's params (new memory, built in
    a rotated order), `warmup` rounds, then `repeats` timed rounds. Where a copy's
    memory lands moves its step by a few percent on a VM, and that luck stays
    with the copy for the whole trial; fresh copies per trial turn it into
    noise that the median over every trial's rounds sees past."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    max_norm = 0.5 * float(norm)  # every step clips
    makers = _contenders(max_norm, twin)
    names = list(makers)
    refs = names[:2] if twin else names[:1]  # the unclipped copies
    bwd = {n: [] for n in names}
    stp = {n: [] for n in names}
    norm_stats = {}

    def one(r, record):
        r["opt"].zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        torch.autograd.backward(r["params"], grads)
        sync(device)
        t1 = time.perf_counter()
        r["step"]()
        sync(device)
        t2 = time.perf_counter()
        if record:
            bwd[r["name"]].append(t1 - t0)
            stp[r["name"]].append(t2 - t1)

    def trial(t):
        # in a function of its own, so that its copies are freed before the next trial's
        rows = []
        for name in names[t % len(names):] + names[:t % len(names)]:
            params = [p.clone().requires_grad_(True) for p in init]
            opt, step = makers[name](params)
            rows.append(dict(name=name, params=params, opt=opt, step=step))
        rows.sort(key=lambda r: names.index(r["name"]))
        for _ in range(warmup):
            for r in rows:
                one(r, False)
        for k in range(repeats):
            for r in rows[k % len(rows):] + rows[:k % len(rows)]:
                one(r, True)
        for r in rows:
            stats = getattr(r["opt"], "norm_stats", None)
            if stats is not None:
                acc = norm_stats.setdefault(r["name"], dict.fromkeys(stats, 0))
                for key, v in stats.items():
                    acc[key] += v

    for t in range(trials):
        trial(t)
    # each round's reference: the mean of the unclipped copies (with --twin
    # two, whose luck of placement then averages)
    ref_step = e2e.round_means([stp[n] for n in refs])
    ref_iter = e2e.round_means([[a + b for a, b in zip(stp[n], bwd[n])] for n in refs])
    out = []
    for n in names:
        step_ratio, per_trial = e2e.paired_medians(stp[n], ref_step, repeats)
        out.append(dict(
            name=n, step_ms=1e3 * statistics.median(stp[n]),
            backward_ms=1e3 * statistics.median(bwd[n]),
            step_vs_unclipped=step_ratio, step_vs_unclipped_per_trial=per_trial,
            iteration_vs_unclipped=e2e.paired_medians(
                [a + b for a, b in zip(stp[n], bwd[n])], ref_iter, repeats)[0],
            norm_stats=norm_stats.get(n)))
    return out


def _table(rows):
    lines = ["| contender | step ms | backward ms | step x unclipped | per trial | "
             "backward + step x unclipped |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        trials = " ".join(f"{x:.3f}" for x in r["step_vs_unclipped_per_trial"])
        lines.append(f"| {r['name']} | {r['step_ms']:.1f} | {r['backward_ms']:.1f} | "
                     f"{r['step_vs_unclipped']:.3f} | {trials} | {r['iteration_vs_unclipped']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fused_wd.bench.norm_backward", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-50m")
    ap.add_argument("--params", default=None, help="scale the preset to about N params (50M, 1.5B)")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3,
                    help="fresh copies of every contender this many times, each stepped for "
                         "--repeats rounds; ratios are medians over all of them")
    ap.add_argument("--e2e-repeats", type=int, default=0,
                    help="also run the end-to-end small-GPT loop (fused_wd.bench.e2e, its CPU or "
                         "GPU config) with this many interleaved rounds per trial")
    ap.add_argument("--hook-min", type=int, default=None,
                    help="params of this many elements or more get a norm hook (default: the "
                         "library's _HOOK_READ_MIN); for A/B runs of the hook size")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="keep: glibc's malloc keeps freed memory for reuse (see keep_freed_memory; "
                         "for the whole process); default: leave it as it is")
    ap.add_argument("--twin", action="store_true",
                    help="also step a second unclipped copy (the noise floor between contenders)")
    ap.add_argument("--out", default=None, help="directory for report.md and results.json")
    args = ap.parse_args(argv)
    kept = args.malloc == "keep" and keep_freed_memory()
    shapes = get_shapes(args.preset, parse_count(args.params) if args.params else None)
    from fused_wd import _norm_slots
    if args.hook_min is not None:
        _norm_slots._HOOK_READ_MIN = args.hook_min
    device = torch.device(args.device)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = environment(device, argv)
    env["command"] = " ".join(["python -m fused_wd.bench.norm_backward"] + argv)
    report = ["# The clipped step with the norm gathered in backward", "",
              f"Command: `{env['command']}`", "",
              f"- device: {env['device_name']}, {env['torch_threads']} threads; torch {env['torch']}; "
              f"fused_wd at {env['git_commit']} (dirty: {env['git_dirty']}); {env['date']}",
              f"- "
              f"{sum(int(torch.Size(s).numel()) for s in shapes) / 1e6:.1f}M params in "
              f"{len(shapes)} tensors ({args.preset}); {args.trials} trials (fresh copies) of {args.repeats} interleaved rounds; norm hooks on "
              f"params with >= {_norm_slots._HOOK_READ_MIN} elements",
              "- malloc: " + ("freed memory kept for reuse (glibc mallopt: no mmap, no trim)" if kept
                              else "as the process had it"), ""]
    results = {"env": env, "args": vars(args), "tables": {}}
    for name in args.dtype.split(","):
        rows = run(shapes, DTYPES[name], device, args.repeats, args.warmup, twin=args.twin,
                   trials=args.trials)
        results["tables"][name] = rows
        report += [f"## AdamW, {name}", "", _table(rows), ""]
        print(f"\n{name}\n" + _table(rows), flush=True)
    if args.e2e_repeats:
        cfg = dataclasses.replace(e2e.PRESETS["gpu" if device.type == "cuda" else "cpu"],
                                  repeats=args.e2e_repeats, trials=args.trials, twin=args.twin)
        res = e2e.run_e2e(device, cfg)
        results["e2e"] = res
        text = e2e_table(res)
        report += [f"## End-to-end: {res['model']}, {res['nparams'] / 1e6:.1f}M params", "",
                   "Forward, backward and the optimizer part, per training step; \"time / "
                   "unclipped\" is the median over all trials' rounds of the ratio to the unclipped "
                   "fused_wd loop of the same round (with --twin, the mean of its two copies); per trial: "
                   + "; ".join(f"{r['label']}: " + " ".join(f"{x:.3f}" for x in r["time_vs_unclipped_per_trial"])
                               for r in res["rows"].values() if "time_vs_unclipped_per_trial" in r)
                   + ".", "", text, ""]
        print("\n" + text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write("\n".join(report) + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
