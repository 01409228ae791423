"""Host cost per tensor of the CUDA update ops, measured without a GPU.

The CUDA backend's host code (argument checks, grouping, table packing,
launch shapes: csrc/cuda) is compiled for the host by the emulated tests'
build (tests/emu_build.py, with CUDA 12.1's real 32764-byte tables here) and
run with FUSED_WD_EMU_HOST_ONLY=1, so that a launch is checked and counted
but its blocks do not run: the time of an op call is then that host code's
alone, the part that a step over thousands of small tensors pays on a GPU
machine's CPU (a real launch adds the CUDA driver's few microseconds per
launch, about 500 tensors each). The CPU op (its checks, gather and the
kernels on 16 elements) runs on the same arguments alongside.

Many tiny fp32 tensors; a fresh set of grads for every call and 64 MiB of
other memory touched in between (as forward and backward would; 4 leaves
the last-level cache alone), the two ops interleaved, called as the
optimizers' steady steps call them (a KeptCall, under no_grad); median
microseconds per tensor.

    python benchmarks/cuda_host_cost.py [--counts 1000,10000] [--rounds 41] [--evict-mib 64]
"""
import argparse
import os
import statistics
import sys
import time

os.environ["FUSED_WD_EMU_HOST_ONLY"] = "1"  # before the emulation library's first launch

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import emu_build  # noqa: E402
from fused_wd import _ops  # noqa: E402  (loads torch.ops.fused_wd)

NUMEL = 16


def call_kwargs(optim, count, gen):
    """The keyword arguments of one op call over `count` tiny tensors, with
    three sets of grads to cycle."""
    t = lambda: 0.02 * torch.randn(NUMEL, generator=gen)  # noqa: E731
    params = _ops.CppList([t() for _ in range(count)])
    grads = [[t() for _ in range(count)] for _ in range(3)]
    if optim == "adamw":
        kw = dict(params=params, exp_avgs=[torch.zeros(NUMEL) for _ in range(count)],
                  exp_avg_sqs=[torch.zeros(NUMEL) for _ in range(count)], max_exp_avg_sqs=[],
                  state_steps=[torch.zeros(()) for _ in range(count)], master_params=[],
                  lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
                  decay_mode=1)
    else:
        kw = dict(params=params, momentum_buffers=[torch.zeros(NUMEL) for _ in range(count)],
                  buffer_is_new=[False] * count, master_params=[], state_steps=[], lr=1e-3,
                  momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01, decay_mode=0)
    return kw, grads


@torch.no_grad()  # as the optimizers' steps
def measure(count, optim, rounds, namespaces, evict_mib=64):
    """{namespace: [seconds per call]}, the namespaces' ops interleaved."""
    name = "adam_" if optim == "adamw" else "sgd_"
    runs = {}
    for k, ns in enumerate(namespaces):
        kw, grads = call_kwargs(optim, count, torch.Generator().manual_seed(k))
        runs[ns] = (_ops.kept_call(name, kw, namespace=ns), [_ops.CppList(g) for g in grads], kw["params"][0])
    before = {ns: runs[ns][2].clone() for ns in namespaces}
    other = torch.zeros(evict_mib << 18)  # float32: 4 bytes each
    times = {ns: [] for ns in namespaces}
    for r in range(rounds + 3):
        for ns in namespaces:
            call, grads, _ = runs[ns]
            call.tensors("grads", grads[r % 3])
            other.add_(1.0)
            t0 = time.perf_counter()
            call.run(1e-3, None)
            if r >= 3:
                times[ns].append(time.perf_counter() - t0)
    # what was timed: the CPU op updated its params, the CUDA host code only
    # checked, packed and counted its launches
    moved = {ns: not torch.equal(before[ns], runs[ns][2]) for ns in namespaces}
    assert moved == {"fused_wd": True, "fused_wd_emu": False}, moved
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,10000")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--evict-mib", type=int, default=64,
                    help="MiB of other memory touched before each call (64: beyond the last-level cache)")
    args = ap.parse_args()
    emu_build.load(arg_bytes=32764)
    namespaces = ("fused_wd", "fused_wd_emu")
    print(f"torch {torch.__version__}; median us per tensor over {args.rounds} interleaved calls, "
          f"{args.evict_mib} MiB touched before each")
    print("| tensors | step | CPU op (checks, gather, kernels) | CUDA host code (checks, tables, launches) |")
    print("|---:|:---|---:|---:|")
    for count in (int(c) for c in args.counts.split(",")):
        for optim, label in (("adamw", "AdamW"), ("sgd", "SGD momentum")):
            times = measure(count, optim, args.rounds, namespaces, args.evict_mib)
            us = [statistics.median(times[ns]) / count * 1e6 for ns in namespaces]
            print(f"| {count} | {label} | {us[0]:.3f} | {us[1]:.3f} |")


if __name__ == "__main__":
    main()
