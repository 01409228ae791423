"""How close the fused step comes to its byte floor for each mixed-precision
layout (README, "Mixed precision"): the whole step (clipping included) of
fused_wd.AdamW on ~N params in 160 tensors, against the in-place streaming
bandwidth measured in the same process.

Next to the byte floor it measures the layout's arithmetic floor: the same
step on 64K elements that stay in the caches (minus the step's fixed cost,
timed on 64 elements), scaled to N (and on the CPU shared by the step's
threads: the 64K elements run on one). Where that is above the byte floor the
step is bound by the arithmetic (fp32 math with two divisions and a square
root per element, plus the conversions), not by memory.

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


def make_opt(dtype, opts, device, n_tensors, n_each):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n_each, generator=g).to(device, dtype))
              for _ in range(n_tensors)]
    for p in params:
        p.grad = (torch.randn(n_each, generator=g) * 1e-2).to(device, dtype)
    opt = fused_wd.AdamW(params, lr=1e-4, max_grad_norm=1e9, **opts)
    for _ in range(2):
        opt.step()
    return opt


def step_time(opt, device, repeats, inner=1):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            opt.step()
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def arithmetic_floor(dtype, opts, device, n):
    """Seconds for n elements at the in-cache rate of the step. On the CPU
    the 64K elements are one task, run by the calling thread alone (the ops
    split only larger steps), so that rate is one thread's, and the n
    elements of the full step are shared by all of torch's threads."""
    small = step_time(make_opt(dtype, opts, device, 4, 16384), device, 7, inner=200)
    tiny = step_time(make_opt(dtype, opts, device, 4, 16), device, 7, inner=200)
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return max(small - tiny, 0.0) / 65536 * n / threads


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    n_each = int(args.params) // 160
    n = 160 * n_each
    print(f"{n / 1e6:.1f}M params in 160 tensors on {device}, torch {torch.__version__}")
    print("| layout | B/param (clip) | median ms | GB/s | % of stream BW "
          "| byte floor ms | arithmetic floor ms | % of the higher floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, dtype, opts, nbytes in LAYOUTS:
        opt = make_opt(dtype, opts, device, 160, n_each)
        bw = stream_bandwidth(device, 16 * n_each * 8)
        ms = step_time(opt, device, args.repeats) * 1e3
        del opt
        gbs = nbytes * n / (ms / 1e3) / 1e9
        byte_ms = nbytes * n / bw / 1e6
        arith_ms = arithmetic_floor(dtype, opts, device, n) * 1e3
        print(f"| {name} | {nbytes} | {ms:.1f} | {gbs:.1f} | {100 * gbs / bw:.0f}% (of {bw:.0f} GB/s) "
              f"| {byte_ms:.1f} | {arith_ms:.1f} | {100 * max(byte_ms, arith_ms) / ms:.0f}% |")


if __name__ == "__main__":
    main()
