"""What the decay variants cost: the whole clip + AdamW step of fused_wd on
~N params in 160 tensors with decoupled, cautious and corrected decay
(`--set decay`), with the pass's statistics on (last_weight_norm) and the
automatic modes SWD and AWD (`--set automatic`), or with the CPU kernels'
prefetch settings (`--set prefetch`: each variant runs under its own
fused_wd.set_cpu_tuning), side by side in one process.

Each variant has its own params, grads and state (same values). A round
times one step of every variant, in an order that rotates from round to
round, so that a slow spell of a shared machine hits all of them alike; the
result is the median over rounds of each variant's time divided by the
decoupled step's time in the same round (paired ratios). A second decoupled
optimizer ("decoupled, again") shows the noise of such a ratio.

    python benchmarks/decay_variants.py [--set decay|automatic|prefetch] [--dtype fp32|bf16] [--clip on|off]
                                        [--params 50e6] [--rounds 15] [--device cpu]
"""
import argparse
import platform
import statistics
import subprocess
import time

import torch

import fused_wd

# the option "statistics" is not the optimizer's: it reads last_weight_norm
# once before timing, which makes every later step write the statistics
SETS = {
    "decay": [
        ("decoupled", dict()),
        ("decoupled, again", dict()),
        ("cautious (decoupled)", dict(cautious_weight_decay=True)),
        ("corrected", dict(weight_decay_mode="corrected")),
    ],
    "automatic": [
        ("decoupled", dict()),
        ("decoupled, again", dict()),
        ("decoupled + statistics", dict(statistics=True)),
        ("scheduled (SWD)", dict(weight_decay_mode="scheduled")),
        ("adaptive (AWD)", dict(weight_decay_mode="adaptive")),
    ],
    # (blocks ahead, locality): the first is the Intel rule's setting
    "prefetch": [
        ("prefetch 8:3", dict(tuning=(8, 3))),
        ("prefetch 8:3, again", dict(tuning=(8, 3))),
        ("prefetch off", dict(tuning=(0, 3))),
        ("prefetch 4:3", dict(tuning=(4, 3))),
        ("prefetch 16:3", dict(tuning=(16, 3))),
        ("prefetch 8:0 (non-temporal)", dict(tuning=(8, 0))),
    ],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def make_opt(opts, device, n_tensors, n_each, dtype, clip):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n_each, generator=g).to(device, dtype)) for _ in range(n_tensors)]
    for p in params:
        # random signs: about half the coordinates are masked under cautious decay
        p.grad = (torch.randn(n_each, generator=g) * 1e-2).to(device, dtype)
    opts = dict(opts)
    statistics = opts.pop("statistics", False)
    opts.pop("tuning", None)
    opt = fused_wd.AdamW(params, lr=1e-4, weight_decay=0.1, max_grad_norm=1.0 if clip else None, **opts)
    for _ in range(2):
        opt.step()
    if statistics:
        assert opt.last_weight_norm is not None
    return opt


def timed_step(opt, device, tuning=None):
    if tuning is not None:
        fused_wd.set_cpu_tuning(*tuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--tensors", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", default="decay", choices=sorted(SETS))
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--clip", default="on", choices=["on", "off"])
    args = ap.parse_args()
    variants = SETS[args.set]
    dtype, clip = DTYPES[args.dtype], args.clip == "on"
    device = torch.device(args.device)
    n_each = int(args.params) // args.tensors
    opts = [(name, make_opt(o, device, args.tensors, n_each, dtype, clip)) for name, o in variants]
    tunings = {name: o.get("tuning") for name, o in variants}
    before = fused_wd.cpu_tuning() if device.type == "cpu" else None
    times = {name: [] for name, _ in variants}
    ratios = {name: [] for name, _ in variants[1:]}
    for r in range(args.rounds):
        k = r % len(opts)
        order = opts[k:] + opts[:k]
        this = {name: timed_step(opt, device, tunings[name]) for name, opt in order}
        for name, t in this.items():
            times[name].append(t)
        for name in ratios:
            ratios[name].append(this[name] / this[variants[0][0]])
    dev = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    if before is not None:
        fused_wd.set_cpu_tuning(before["prefetch_blocks"], before["locality"])
        dev += f" ({fused_wd._ext.C.cpu_isa()}; default tuning: {before['reason']})"
    print(f"{'clip + ' if clip else ''}AdamW, {args.dtype}, {args.tensors * n_each / 1e6:.1f}M params in "
          f"{args.tensors} tensors, {args.rounds} rounds, {torch.get_num_threads()} threads; {dev}; "
          f"torch {torch.__version__}")
    print(f"| variant | median ms | min-max ms | median of paired ratios to {variants[0][0]} | ratios min-max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, _ in variants:
        ts = [1e3 * t for t in times[name]]
        row = f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f}-{max(ts):.1f} |"
        if name in ratios:
            rs = ratios[name]
            row += f" {statistics.median(rs):.3f} | {min(rs):.3f}-{max(rs):.3f} |"
        else:
            row += " 1 | |"
        print(row)


if __name__ == "__main__":
    main()
