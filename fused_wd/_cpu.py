"""Which CPU this is, in the words benchmark results need: vendor, family,
model and stepping as the CPU reports them, the core generation where it is
known, the instruction-set extensions the kernels care about and the cache
sizes. `python -m fused_wd info` prints it and the benchmarks record it, so
that a result names the machine that made it even where the model name is
only "AMD EPYC" (as on cloud VMs)."""
from __future__ import annotations

import os
import platform

# AMD core generations by (family, first model, last model), from AMD's
# published family/model numbers; other vendors are reported by number only.
_AMD_CORES = (
    (0x17, 0x00, 0x2F, "Zen/Zen+"),
    (0x17, 0x30, 0xFF, "Zen 2"),
    (0x19, 0x00, 0x0F, "Zen 3"),
    (0x19, 0x10, 0x1F, "Zen 4"),
    (0x19, 0x20, 0x5F, "Zen 3"),
    (0x19, 0x60, 0xAF, "Zen 4"),
    (0x1A, 0x00, 0xFF, "Zen 5"),
)

# the extensions the CPU kernels or their tuning depend on
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
          "avx512_fp16", "amx_bf16")


def core_name(vendor: str, family: int | None, model: int | None) -> str | None:
    """The core generation of an AMD (vendor, family, model), or None."""
    if vendor != "AuthenticAMD" or family is None or model is None:
        return None
    for fam, first, last, name in _AMD_CORES:
        if family == fam and first <= model <= last:
            return name
    return None


def parse_cpuinfo(text: str) -> dict:
    """The first processor's fields of a /proc/cpuinfo text."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info = {"model_name": fields.get("model name"), "vendor": fields.get("vendor_id")}
    for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")):
        try:
            info[name] = int(fields[key])
        except (KeyError, ValueError):
            info[name] = None
    flags = set(fields.get("flags", "").split())
    info["isa_flags"] = [f for f in _FLAGS if f in flags]
    info["core"] = core_name(info["vendor"], info["family"], info["model"])
    return info


def _caches(root="/sys/devices/system/cpu/cpu0/cache") -> dict:
    """{"L1d": "48K", "L2": "1024K", "L3": "32768K"} of the first CPU."""
    out = {}
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        if not name.startswith("index"):
            continue
        try:
            def read(f, name=name):
                with open(os.path.join(root, name, f)) as fh:
                    return fh.read().strip()
            level, kind, size = read("level"), read("type"), read("size")
        except OSError:
            continue
        if kind == "Instruction":
            continue
        out[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return out


def identity() -> dict:
    """This machine's CPU: model_name, vendor, family, model, stepping,
    core (or None), isa_flags, caches."""
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"model_name": platform.processor() or platform.machine(), "vendor": None,
                "family": None, "model": None, "stepping": None, "isa_flags": [], "core": None}
    info["caches"] = _caches()
    return info


def describe(info: dict) -> str:
    """One line, e.g. "AMD EPYC (family 26 model 2 stepping 1, Zen 5; L2 1024K, L3 32768K)"."""
    name = info.get("model_name") or "unknown CPU"
    ident = [f"{k} {info[k]}" for k in ("family", "model", "stepping") if info.get(k) is not None]
    parts = [" ".join(ident)] if ident else []
    if info.get("core"):
        parts[-1:] = [", ".join(parts[-1:] + [info["core"]])]
    caches = info.get("caches") or {}
    cache = ", ".join(f"{k} {caches[k]}" for k in ("L2", "L3") if k in caches)
    inside = "; ".join(p for p in parts + [cache] if p)
    return f"{name} ({inside})" if inside else name
