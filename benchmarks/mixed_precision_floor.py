"""How close the fused step comes to its byte floor for each mixed-precision
layout (README, "Mixed precision"): the whole step (clipping included) of
fused_wd.AdamW on ~N params in 160 tensors, against the in-place streaming
bandwidth measured in the same process.

    python benchmarks/mixed_precision_floor.py [--params 50e6] [--device cpu]
"""
import argparse
import statistics
import time

import torch

import fused_wd

# (name, param dtype, optimizer options, bytes/param/step with clipping)
LAYOUTS = [
    ("fp32", torch.float32, {}, 32),
    ("bf16, bf16 m v", torch.bfloat16, {}, 16),
    ("bf16, bf16 m v, stochastic rounding", torch.bfloat16, dict(stochastic_rounding=True), 16),
    ("bf16 + fp32 master, fp32 m v", torch.bfloat16, dict(master_weights=True), 30),
    ("bf16 + fp32 master, bf16 m v", torch.bfloat16,
     dict(master_weights=True, state_dtype=torch.bfloat16), 22),
    ("fp32, bf16 m v", torch.float32, dict(state_dtype=torch.bfloat16), 24),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def stream_bandwidth(device, n):
    x = torch.ones(n, device=device)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.mul_(1.0001)
        sync(device)
        times.append(time.perf_counter() - t)
    return 8 * n / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    n_each = int(args.params) // 160
    print(f"{160 * n_each / 1e6:.1f}M params in 160 tensors on {device}, torch {torch.__version__}")
    print("| layout | B/param (clip) | median ms | GB/s | % of stream BW |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, dtype, opts, nbytes in LAYOUTS:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n_each, generator=g).to(device, dtype)) for _ in range(160)]
        for p in params:
            p.grad = (torch.randn(n_each, generator=g) * 1e-2).to(device, dtype)
        opt = fused_wd.AdamW(params, lr=1e-4, max_grad_norm=1e9, **opts)
        for _ in range(2):
            opt.step()
        bw = stream_bandwidth(device, 16 * n_each * 8)
        times = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        gbs = nbytes * 160 * n_each / (ms / 1e3) / 1e9
        print(f"| {name} | {nbytes} | {ms:.1f} | {gbs:.1f} | {100 * gbs / bw:.0f}% (of {bw:.0f} GB/s) |")
        del opt, params


if __name__ == "__main__":
    main()
