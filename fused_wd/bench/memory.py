"""Extra peak memory during one optimizer step (beyond what was live before it).

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus the allocated bytes before the step.

CPU (Linux): the process's resident high-water mark, reset right before the
step. Free heap pages are first returned to the OS (``malloc_trim``) so a
temporary the step allocates has to fault in fresh pages, then
``/proc/self/clear_refs`` is written with ``5``, which resets ``VmHWM`` to the
current ``VmRSS``; after the step ``VmHWM - VmRSS(before)`` is the extra peak.
This works in one process, for every implementation in turn, without being
hidden by an earlier, larger peak as a plain ``ru_maxrss`` delta would be.
Where that interface is missing the value is reported as n/a.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

from .bandwidth import sync

_LIBC = None
_CPU_OK: bool | None = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_supported() -> bool:
    global _CPU_OK
    if _CPU_OK is None:
        _CPU_OK = _status_kb("VmHWM") is not None and _reset_hwm()
    return _CPU_OK


def method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() during the step minus memory_allocated() before it"
    if cpu_supported():
        return "resident high-water mark (VmHWM, reset via /proc/self/clear_refs after malloc_trim) minus VmRSS before the step"
    return "unavailable on this OS (needs Linux /proc/self/clear_refs)"


def extra_peak_bytes(step, device: torch.device) -> int | None:
    """Run ``step()`` once and return the extra peak bytes it needed, or None."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if not cpu_supported():
        step()
        return None
    lib = _libc()
    if lib:
        try:
            lib.malloc_trim(0)
        except AttributeError:
            pass
    _reset_hwm()
    base = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def count_launches(step, device: torch.device) -> int | None:
    """GPU kernel launches (kernels, memcpy and memset on the device) in one step, via torch.profiler."""
    if device.type != "cuda":
        return None
    ran = False
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ran = True
            step()
            sync(device)
        n = 0
        for e in prof.events():
            if getattr(e, "device_type", None) == DeviceType.CUDA:
                n += 1
        return n
    except Exception:  # noqa: BLE001 - the profiler is optional information
        if not ran:
            step()  # keep the step count identical across implementations
        return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        return 0


def free_ram_bytes() -> int:
    from .bandwidth import _available_ram
    return _available_ram()


def device_free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return free_ram_bytes()


__all__ = ["extra_peak_bytes", "count_launches", "method", "device_free_bytes", "rss_bytes"]
