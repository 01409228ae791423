"""``python -m fused_wd.bench``: the command line."""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time

import torch

from . import e2e as e2e_mod
from . import memory, report, sysload
from .bandwidth import StreamProbe
from .impls import IMPLS, OPTIMS, Hyper, resolve
from .presets import PRESETS, fmt_count, get_shapes, parse_count
from .progress import Progress
from .runner import DTYPES, Case, RunOpts, run_case

DEFAULT_PRESET = "gpt2-124m"
DEFAULT_SIZES = {"cpu": ["1M", "4M", "16M"], "cuda": ["4M", "32M", "124M"]}
QUICK_SIZES = {"cpu": ["4M"], "cuda": ["32M"]}
SWEEP_SIZES = {"cpu": ["1M", "3M", "10M", "30M", "100M"],
               "cuda": ["1M", "4M", "16M", "64M", "256M", "1B", "2B"]}
QUICK_SWEEP_SIZES = {"cpu": ["1M", "10M", "30M"], "cuda": ["1M", "16M", "256M", "1B"]}


def _csv(choices=None, conv=str):
    def parse(text):
        vals = [conv(v.strip()) for v in text.split(",") if v.strip()]
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        if choices:
            bad = [v for v in vals if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))} not in {', '.join(choices)}")
        return vals
    return parse


def _preset_list(text):
    """'llama-1b:300M,many-small' -> [("llama-1b", 300000000), ("many-small", None)]"""
    out = []
    for part in _csv()(text):
        name, _, count = part.partition(":")
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        try:
            out.append((name, parse_count(count) if count else None))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_wd.bench",
        description="Time the whole optimizer step (clipping included) of fused_wd against torch.optim "
                    "(for-loop, foreach, fused), fused_wd.reference and peers, side by side in one process, "
                    "against the machine's measured memory bandwidth. With no arguments: a small default "
                    "(about 2 minutes on a 2-core CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--preset", type=_preset_list, default=None,
                   help=f"parameter shapes (default {DEFAULT_PRESET}); see --list. A comma list runs each in turn; "
                        "NAME:COUNT scales that one to about COUNT params (llama-1b:300M,many-small)")
    p.add_argument("--params", type=parse_count, default=None,
                   help="scale the preset (each one without its own :COUNT) to about N params (50M, 1.5B, ...), "
                        "keeping tensor count and proportions")
    p.add_argument("--sizes", type=_csv(conv=parse_count), default=None,
                   help="explicit list of parameter counts, e.g. 1M,10M,100M")
    p.add_argument("--sweep", action="store_true",
                   help="scaling study over parameter counts (CPU 1M..100M, GPU 1M..2B)")
    p.add_argument("--optim", type=_csv(OPTIMS), default=None,
                   help="comma list of adam,adamw,sgd (default: the preset's runs, adamw and sgd)")
    p.add_argument("--clip", choices=["on", "off", "both"], default=None,
                   help="global-norm gradient clipping (default: on, or the preset's runs)")
    p.add_argument("--dtype", type=_csv(list(DTYPES)), default=["fp32"],
                   help="comma list of fp32,bf16 (fp16, fp64 also accepted)")
    p.add_argument("--impl", default="all",
                   help="comma list of " + ",".join(IMPLS) + " or groups torch, peers; default all")
    p.add_argument("--quick", action="store_true", help="one small size, fewer rounds, short end-to-end case")
    p.add_argument("--out", default="bench_out", help="directory for report.md, results.json, bandwidth.png")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per table (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per implementation (default 3, quick 1)")
    p.add_argument("--min-repeat-ms", type=float, default=None,
                   help="each round times enough steps to last at least this long (default CPU 20, GPU 5)")
    p.add_argument("--iters", type=int, default=None,
                   help="steps per timed round (default: enough to last --min-repeat-ms, at most 50 CPU / 100 GPU)")
    p.add_argument("--bw-mib", type=int, default=None,
                   help="size of the bandwidth probe buffer (default: 4x the last-level cache, at least 1 GiB, "
                        "at most 1/8 of free RAM; GPU 1 GiB)")
    p.add_argument("--e2e", choices=["on", "off", "tiny"], default="on",
                   help="end-to-end small-transformer training case")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the oracle")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--mem-fraction", type=float, default=0.6,
                   help="memory budget as a fraction of free memory; above it implementations run one at a time")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="on a shared machine: before each table wait up to S seconds for other processes to go "
                        "quiet, and measure a disturbed table once more, keeping the less disturbed result")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list presets and implementations, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks for failing implementations")
    return p


def list_things(device: torch.device) -> str:
    lines = ["presets:"]
    for name, pr in PRESETS.items():
        lines.append(f"  {name:11s} {fmt_count(pr.numel):>6s} params, {len(pr.shapes):5d} tensors  {pr.description}")
    lines.append(f"implementations on {device.type}:")
    for name, im in IMPLS.items():
        why = im.check(device.type, "adamw", torch.float32)
        lines.append(f"  {name:14s} {'available' if why is None else why}")
    return "\n".join(lines)


def plan(args, device) -> list:
    """-> [(preset name, size or None, [(optim, clip, dtype)])], one entry per table row group, in run order"""
    dev = device.type
    if args.sizes:
        sizes = args.sizes
    elif args.sweep:
        sizes = [parse_count(s) for s in (QUICK_SWEEP_SIZES if args.quick else SWEEP_SIZES)[dev]]
    elif args.params:
        sizes = [args.params]
    elif args.preset:
        sizes = [None]  # the preset's own size
    else:
        sizes = [parse_count(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES)[dev]]
    out = []
    for preset, count in args.preset or [(DEFAULT_PRESET, None)]:
        if args.optim is None and args.clip is None:
            runs = list(PRESETS[preset].default_runs)
        else:
            optims = args.optim or list(dict.fromkeys(o for o, _ in PRESETS[preset].default_runs))
            clips = {"on": [True], "off": [False], "both": [True, False], None: [True]}[args.clip]
            runs = list(itertools.product(optims, clips))
        combos = [(o, c, d) for d in args.dtype for (o, c) in runs]
        out += [(preset, size, combos) for size in ([count] if count else sizes)]
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available to torch "
              f"{torch.__version__} (torch.version.cuda={torch.version.cuda})", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        print(list_things(device))
        return 0
    try:
        names = resolve(args.impl)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2

    studies = {PRESETS[name].study for name, _ in args.preset or []}
    if "overhead" in studies:
        if len(args.preset) > 1:
            print("--preset overhead is a study of its own: run it without other presets", file=sys.stderr)
            return 2
        from . import overhead
        if args.impl == "all":
            names = list(overhead.DEFAULT_IMPLS)
        return overhead.run(args, device, names, argv)

    t_start = time.perf_counter()
    snap_start = sysload.Snapshot()
    load_start = sysload.loadavg()
    quick = args.quick
    opts = RunOpts(
        repeats=args.repeats if args.repeats is not None else (3 if quick else 7),
        warmup=max(1, args.warmup if args.warmup is not None else (1 if quick else 3)),
        min_repeat_s=(args.min_repeat_ms if args.min_repeat_ms is not None
                      else (20.0 if device.type == "cpu" else 5.0)) / 1e3,
        max_iters=50 if device.type == "cpu" else 100, fixed_iters=args.iters,
        check=not args.no_check, seed=args.seed, mem_fraction=args.mem_fraction)
    planned = plan(args, device)

    env = report.environment(device, argv)
    res = {"env": env, "cases": [], "notices": [], "args": vars(args).copy()}
    res["args"]["impl"] = names
    res["memory_method"] = memory.method(device)

    e2e_cfg = None
    if args.e2e != "off":
        key = "tiny" if args.e2e == "tiny" else ("gpu" if device.type == "cuda" else ("quick" if quick else "cpu"))
        e2e_cfg = e2e_mod.PRESETS[key]

    total = (sum(len(combos) for _, _, combos in planned) * (1 + opts.repeats)
             + (e2e_mod.units(e2e_cfg) if e2e_cfg else 0) + 2)
    all_combos = list(dict.fromkeys(c for _, _, combos in planned for c in combos))
    prog = Progress(total, enabled=not args.no_progress)
    log = prog.write

    # which implementations cannot run at all: one line each
    for n in names:
        whys = {IMPLS[n].check(device.type, o, DTYPES[d]) for (o, _, d) in all_combos}
        if all(whys) and whys:
            why = sorted(whys, key=lambda w: ("pip install" not in w, w))[0]
            res["notices"].append(f"{n}: {why}")
            log(f"{n}: {why}")

    # JIT-built peers (DeepSpeed) compile on first use: do it now, not inside a timed table
    for n in names:
        if IMPLS[n].kind == "peer":
            for (o, _, d) in all_combos:
                if IMPLS[n].check(device.type, o, DTYPES[d]) is None:
                    prog.set(f"preparing {n} (first use may compile it)")
                    err = IMPLS[n].prepare(device, o, DTYPES[d])
                    if err:
                        log(f"{n}: preparing failed: {err}")
                    break
    prog.set("measuring memory bandwidth")
    snap = sysload.Snapshot()
    probe = StreamProbe(device, args.bw_mib * 2**20 if args.bw_mib else None)
    res["bandwidth"] = probe.measure()
    busy = snap.others_share()
    res["bandwidth"]["others_cpu"] = busy
    prog.update(1)
    if busy is not None and busy >= 0.1:
        log(f"warning: other processes are using {busy:.0%} of the CPUs; timings will be disturbed "
            "(each table says how much)")
    log(f"{env['device_name']}: stream bandwidth {res['bandwidth']['median_gbps']:.1f} GB/s "
        f"({res['bandwidth']['method']})")

    interrupted = False
    try:
        for preset, size, combos in planned:
            shapes = get_shapes(preset, size)
            for optim, clip, dname in combos:
                case = Case(preset, shapes, optim, clip, DTYPES[dname], device, size)
                r = None
                for attempt in range(1 + (1 if args.wait_quiet else 0)):
                    if args.wait_quiet:
                        waited = sysload.wait_quiet(args.wait_quiet, lambda m: prog.set(m))
                        if waited is False:
                            log(f"still busy after waiting {args.wait_quiet:.0f} s; measuring anyway")
                    t0 = time.perf_counter()
                    snap = sysload.Snapshot()
                    if attempt:
                        prog.add_total(1 + opts.repeats)
                    rr = run_case(case, names, Hyper(), opts, probe, prog, verbose=args.verbose)
                    rr["wall_s"] = time.perf_counter() - t0
                    rr["others_cpu"] = snap.others_share()
                    if attempt:
                        rr["attempts"] = attempt + 1
                    if r is None or (rr.get("others_cpu") or 0) < (r.get("others_cpu") or 0):
                        r = rr
                    if rr.get("skipped") or (rr.get("others_cpu") or 0) < report.BUSY:
                        break
                    log(f"{report.case_summary(rr)}  [disturbed: {rr['others_cpu']:.0%} other load; retrying]")
                res["cases"].append(r)
                if r.get("skipped"):
                    prog.update(1 + opts.repeats)
                    log(f"{case.title}: skipped: {r['skipped']}")
                else:
                    log(report.case_summary(r))
                gc.collect()
        if e2e_cfg is not None:
            prog.set("end-to-end training loop")
            try:
                snap = sysload.Snapshot()
                res["e2e"] = e2e_mod.run_e2e(device, e2e_cfg, prog, seed=args.seed)
                res["e2e"]["others_cpu"] = snap.others_share()
            except Exception as e:  # noqa: BLE001
                res["e2e_error"] = f"failed: {type(e).__name__}: {e}"[:300]
                if args.verbose:
                    raise
    except KeyboardInterrupt:
        interrupted = True
        res["notices"].append("interrupted: partial results")
    prog.set("bandwidth at end")
    try:
        res["bandwidth_end"] = probe.measure(reps=3)
    except Exception:  # noqa: BLE001
        pass
    probe.free()
    prog.update(1)
    prog.close()

    os.makedirs(args.out, exist_ok=True)
    if not args.no_plot:
        from . import plot
        if plot.have_matplotlib():
            try:
                res["plot"] = os.path.basename(plot.plot(res, os.path.join(args.out, "bandwidth.png")))
            except Exception as e:  # noqa: BLE001
                res["notices"].append(f"plot failed: {type(e).__name__}: {e}"[:200])
        else:
            res["notices"].append("plot skipped: matplotlib is not installed (pip install matplotlib)")
    res["wall_s"] = time.perf_counter() - t_start
    res["load"] = {"others_cpu": snap_start.others_share(), "loadavg_1min_start": load_start,
                   "loadavg_1min_end": sysload.loadavg(), "cpus": os.cpu_count()}
    text = report.render_text(res, markdown=False)
    paths = report.write_all(res, args.out)
    print(text)
    print(f"wrote {paths['markdown']}, {paths['json']}"
          + (f", {os.path.join(args.out, res['plot'])}" if res.get("plot") else "")
          + f" in {res['wall_s']:.0f} s")
    return 130 if interrupted else 0
