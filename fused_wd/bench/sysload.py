"""How much CPU other processes used while we measured.

Benchmarks on a shared machine are disturbed by whatever else runs; on a
2-core box one busy neighbour halves the bandwidth and makes every parallel
region wait for a descheduled thread. We read the machine's busy time from
/proc/stat and subtract this process's own CPU time: what is left was used by
others, reported as a share of all CPUs over the interval.
"""
from __future__ import annotations

import os
import resource
import time

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        if parts[0] != "cpu":
            return None
        v = [int(x) for x in parts[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return (sum(v[:8]) - idle) / _HZ  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


def _own_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Snapshot:
    def __init__(self):
        self.t = time.perf_counter()
        self.busy = _busy_s()
        self.own = _own_s()

    def others_share(self) -> float | None:
        """Fraction of all CPUs used by other processes since self was taken."""
        later = Snapshot()
        dt = later.t - self.t
        if self.busy is None or later.busy is None or dt <= 0.05:
            return None
        ncpu = os.cpu_count() or 1
        others = (later.busy - self.busy) - (later.own - self.own)
        return max(0.0, min(1.0, others / (dt * ncpu)))


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def wait_quiet(timeout_s: float, status=None, threshold: float = 0.05, window_s: float = 1.0) -> bool | None:
    """Block until other processes use less than ``threshold`` of the CPUs over a
    ``window_s`` window, at most ``timeout_s`` seconds. True: quiet; False: timed
    out; None: cannot tell on this OS."""
    deadline = time.perf_counter() + timeout_s
    while True:
        snap = Snapshot()
        time.sleep(window_s)
        share = snap.others_share()
        if share is None:
            return None
        if share < threshold:
            return True
        if time.perf_counter() >= deadline:
            return False
        if status:
            status(f"waiting for a quiet machine: other processes use {share:.0%} of the CPUs")
