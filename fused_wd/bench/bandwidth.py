"""The floor: bytes an optimizer step must move, and the bandwidth to move them.

CPU: in-place streaming bandwidth of all cores (``x.mul_(c)`` over a buffer
much larger than the last-level cache, with torch's own thread pool; read +
write = 8 bytes per fp32 element). GPU: device-to-device copy (read + write).
"""
from __future__ import annotations

import os
import statistics
import time

import torch


def floor_bytes_per_param(optim: str, clip: bool, elem_size: int) -> int:
    """docs/design.md, "The byte floor": AdamW reads p g m v and writes p m v (7 tensors:
    28 B/param in fp32); SGD with momentum reads p g buf and writes p buf (5:
    20 B); global-norm clipping adds one read of g. bf16/fp16 params, grads and
    states count 2 bytes per element instead of 4."""
    if optim in ("adam", "adamw"):
        n = 7
    elif optim == "sgd":
        n = 5  # momentum is always on in this benchmark
    else:
        raise ValueError(optim)
    return (n + (1 if clip else 0)) * elem_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _llc_bytes() -> int:
    """Largest cache the OS reports, 0 if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    txt = f.read().strip()
                mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(txt[-1:], 1)
                best = max(best, int(txt.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return best


def _available_ram() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


class StreamProbe:
    """A buffer and a kernel that measures memory bandwidth each time it runs.

    It runs once at start (the header's number) and then once per round in the
    round-robin of every table, so each table's "% BW" is taken against the
    bandwidth the machine had while that table was measured (VMs and shared
    hosts drift by tens of percent over minutes).
    """

    def __init__(self, device: torch.device, nbytes: int | None = None):
        self.device = device
        if device.type == "cuda":
            if nbytes is None:
                free, _total = torch.cuda.mem_get_info(device)
                nbytes = int(min(1 << 30, free // 8))
            n = max(1, nbytes // 4)
            self.src = torch.ones(n, device=device)
            self.dst = torch.empty_like(self.src)
            self.bytes = 2 * n * 4
            self.method = f"device-to-device copy of {n * 4 / 2**20:.0f} MiB (read + write)"
        else:
            if nbytes is None:
                want = max(1 << 30, 4 * _llc_bytes())
                nbytes = int(min(want, _available_ram() // 8))
                nbytes = max(nbytes, 64 << 20)
            n = max(1, nbytes // 4)
            self.src = torch.ones(n)
            self.dst = None
            self.bytes = 2 * n * 4
            self.method = (f"in-place x.mul_(c) over {n * 4 / 2**20:.0f} MiB fp32, "
                           f"{torch.get_num_threads()} threads (read + write)")
        self.samples: list[float] = []  # GB/s, every run

    def run_once(self) -> float:
        """Time one pass (GPU: several copies), return GB/s and record it."""
        dev = self.device
        if dev.type == "cuda":
            reps = 5
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                self.dst.copy_(self.src)
            sync(dev)
            dt = (time.perf_counter() - t0) / reps
        else:
            t0 = time.perf_counter()
            self.src.mul_(1.0000001)
            dt = time.perf_counter() - t0
        gbps = self.bytes / dt / 1e9
        self.samples.append(gbps)
        return gbps

    def measure(self, reps: int = 7) -> dict:
        """Warm up, then ``reps`` passes: median, best and worst GB/s."""
        self.run_once()
        self.run_once()
        vals = [self.run_once() for _ in range(reps)]
        if self.device.type == "cpu":  # keep values finite and away from denormals
            self.src.fill_(1.0)
        return {"median_gbps": statistics.median(vals), "max_gbps": max(vals), "min_gbps": min(vals),
                "method": self.method, "samples": vals}

    def free(self) -> None:
        self.src = self.dst = None
