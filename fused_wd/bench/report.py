"""Environment capture and the three text outputs: terminal table, markdown report, JSON."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess

import torch

from .. import _cpu
from .impls import BASELINES, IMPLS, torch_default_variant
from .presets import fmt_count

SCHEMA = "fused_wd.bench/1"
BUSY = 0.05  # share of the CPUs used by other processes above which a table is marked disturbed


# ------------------------------------------------------------- environment ----

def _git(*args, cwd=None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, argv: list) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = _git("rev-parse", "HEAD", cwd=root)
    dirty = None
    if commit:
        st = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
        dirty = bool(st) if st is not None else None
    cpu = _cpu.identity()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "cpu_model": cpu.get("model_name"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "command": "python -m fused_wd.bench" + ("" if not argv else " " + " ".join(argv)),
        "torch_default_optim": torch_default_variant(device.type),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu_model"] = torch.cuda.get_device_name(idx)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["device_name"] = info["gpu_model"]
    else:
        info["device_name"] = _cpu.describe(cpu)
    try:
        import fused_wd
        info["fused_wd"] = getattr(fused_wd, "__version__", "?")
        b = getattr(fused_wd, "backends", None)
        info["fused_wd_backends"] = b() if callable(b) else b
        if device.type == "cpu":
            info["cpu_isa"] = fused_wd._ext.C.cpu_isa()
            info["cpu_tuning"] = fused_wd.cpu_tuning()
    except Exception as e:  # noqa: BLE001
        info["fused_wd"] = None
        info["fused_wd_error"] = f"{type(e).__name__}: {e}"[:200]
    return info


# ----------------------------------------------------------------- formats ----

def _ms(s):
    if s is None:
        return "-"
    v = s * 1e3
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _num(v, fmt="{:.1f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _mb(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f}"


def table(headers: list, rows: list, align: str | None = None) -> str:
    """A markdown table with padded columns, readable as is in a terminal."""
    cols = len(headers)
    align = align or ("l" + "r" * (cols - 1))
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(cols)]

    def line(r):
        out = []
        for i, c in enumerate(r):
            out.append(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def impl_label(name: str, env: dict) -> str:
    label = IMPLS[name].label if name in IMPLS else name
    if name == f"torch-{env.get('torch_default_optim')}":
        label += " (default)"
    return label


def check_text(row: dict, oracle: str | None) -> str:
    chk = row.get("check")
    if not chk:
        return "n/a"
    if oracle and row.get("_name") == oracle:
        return "oracle"
    err = chk["rel_err"]
    e = "inf" if not math.isfinite(err) else f"{err:.0e}" if err else "0"
    return f"ok {e}" if chk["ok"] else f"**MISMATCH** {e}"


def case_table(case: dict, env: dict) -> str:
    gpu = case["device"].startswith("cuda")
    base = [b for b in case.get("baselines", [])]
    headers = ["implementation", "median ms", "min-max ms", "GB/s", "% BW"]
    headers += [f"x {b}" for b in base]
    headers += ["extra MB"] + (["launches"] if gpu else []) + ["check"]
    rows = []
    for name, r in case["impls"].items():
        if r.get("status") in ("unavailable", "skipped"):
            continue
        r = dict(r, _name=name)
        if "median_s" not in r:
            rows.append([impl_label(name, env), "failed"] + ["-"] * (len(headers) - 2))
            continue
        sp = r.get("speedup", {})
        cells = [impl_label(name, env), _ms(r["median_s"]), f"{_ms(r['min_s'])}-{_ms(r['max_s'])}",
                 _num(r.get("gbps")), _num(r.get("pct_bw"), "{:.0f}%")]
        cells += ["1.00" if b == name else _num(sp.get(b), "{:.2f}") for b in base]
        cells += [_mb(r.get("extra_peak_bytes"))]
        if gpu:
            cells += [_num(r.get("launches"), "{:d}") if r.get("launches") is not None else "n/a"]
        cells += [check_text(r, case.get("oracle"))]
        rows.append(cells)
    return table(headers, rows)


def case_summary(case: dict) -> str:
    """One line per finished table for the live log: fused_wd's time and its speedups."""
    head = (f"{case['optim']}{'+clip' if case['clip'] else ''} {case['dtype']} {fmt_count(case['nparams'])}"
            f" ({case['wall_s']:.0f} s)" if case.get("wall_s") else "")
    r = case["impls"].get("fused_wd", {})
    if "median_s" not in r:
        others = [f"{n} {_ms(x['median_s'])} ms" for n, x in case["impls"].items() if "median_s" in x]
        return f"{head}: " + ", ".join(others)
    sp = ", ".join(f"{r['speedup'][b]:.2f}x {b}" for b in case.get("baselines", []) if b in r.get("speedup", {}))
    bad = [n for n, x in case["impls"].items() if x.get("check") and not x["check"]["ok"]]
    return (f"{head}: fused_wd {_ms(r['median_s'])} ms, {_num(r.get('pct_bw'), '{:.0f}%')} of bandwidth"
            + (f"; {sp}" if sp else "") + (f"; MISMATCH: {', '.join(bad)}" if bad else ""))


def case_notes(case: dict) -> list:
    notes = []
    for name, r in case["impls"].items():
        if r.get("status") in ("unavailable", "skipped", "failed") and r.get("note"):
            notes.append(f"{name}: {r['note']}")
    return notes


def case_caption(case: dict) -> str:
    bits = [f"floor {case['bytes_per_param']} B/param"]
    if case.get("bw_probe_gbps"):
        bits.append(f"stream bandwidth during this table {case['bw_probe_gbps']:.1f} GB/s")
    if case.get("floor_s"):
        bits.append(f"floor time {_ms(case['floor_s'])} ms")
    bits.append(f"{case.get('repeats')} rounds x {case.get('iters')} steps after {case.get('warmup')} warm-up, "
                f"{case.get('mode')}")
    if case.get("max_grad_norm") is not None and case.get("clip"):
        bits.append(f"max_grad_norm {case['max_grad_norm']:.3g} (half the initial grad norm)")
    oc = case.get("others_cpu")
    if oc is not None and oc >= BUSY:
        bits.append(f"**other processes used {oc:.0%} of the CPUs meanwhile: timings disturbed**")
    return "; ".join(bits)


def sweep_tables(cases: list, env: dict) -> list:
    """For each (preset, optim, clip, dtype) run at several sizes: GB/s per implementation per size."""
    groups: dict = {}
    for c in cases:
        if "impls" not in c or c.get("skipped"):
            continue
        groups.setdefault((c["preset"], c["optim"], c["clip"], c["dtype"]), []).append(c)
    out = []
    for (_preset, optim, clip, dtype), cs in groups.items():
        if len(cs) < 2:
            continue
        cs = sorted(cs, key=lambda c: c["nparams"])
        names = []
        for c in cs:
            for n, r in c["impls"].items():
                if "gbps" in r and n not in names:
                    names.append(n)
        headers = ["GB/s (x torch-fused)"] + [
            f"{fmt_count(c['nparams'])} ({c['ntensors']} t)" + ("*" if (c.get("others_cpu") or 0) >= BUSY else "")
            for c in cs]
        rows = []
        for n in names:
            cells = [impl_label(n, env)]
            for c in cs:
                r = c["impls"].get(n, {})
                if "gbps" in r:
                    sp = 1.0 if n == "torch-fused" else r.get("speedup", {}).get("torch-fused")
                    cells.append(f"{r['gbps']:.1f}" + (f" ({sp:.2f})" if sp else ""))
                else:
                    cells.append("-")
            rows.append(cells)
        rows.append(["stream bandwidth"] + [_num(c.get("bw_probe_gbps")) for c in cs])
        title = f"{optim}{' + clip' if clip else ''}, {dtype}, {cs[0]['preset']} shapes"
        t = table(headers, rows)
        if any(h.endswith("*") for h in headers):
            t += "\n\nSizes marked * were disturbed: other processes used over 5% of the CPUs during their table."
        out.append((title, t))
    return out


def e2e_table(e2e: dict) -> str:
    rows = []
    for name, r in e2e["rows"].items():
        rows.append([r["label"], _ms(r["median_step_s"]), f"{_ms(r['min_step_s'])}-{_ms(r['max_step_s'])}",
                     f"{r['steps_per_s']:.2f}", _num(r.get("speedup_vs_torch_default"), "{:.2f}"),
                     _num(r.get("speedup_vs_torch_fused"), "{:.2f}"),
                     _num(r.get("time_vs_unclipped"), "{:.3f}"),
                     _ms(r.get("opt_median_s")) if r.get("opt_median_s") is not None else "n/a",
                     f"{r['final_loss']:.4f}"])
    return table(["training loop", "step ms", "min-max ms", "steps/s", "x torch default", "x torch fused",
                  "time / unclipped", "clip+step ms", "final loss"], rows)


def _header_rows(res: dict) -> list:
    env = res["env"]
    bw = res.get("bandwidth") or {}
    dev = env["device_name"] + (f" ({env['torch_threads']} threads)" if env["device"] == "cpu" else "")
    commit = (env.get("git_commit") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    rows = [["device", dev], ["torch", env["torch"] + (f", CUDA {env['torch_cuda']}" if env.get("torch_cuda") else "")],
            ["fused_wd", f"{env.get('fused_wd')} at {commit}, backends: {env.get('fused_wd_backends')}"],
            ["date", env["date"]]]
    if env.get("cpu_tuning"):
        t = env["cpu_tuning"]
        rows.append(["CPU kernels", f"{env.get('cpu_isa')}, prefetch {t['prefetch_blocks']} blocks ahead, "
                                    f"locality {t['locality']} ({t['reason']})"])
    if bw:
        end = res.get("bandwidth_end") or {}
        s = f"{bw['median_gbps']:.1f} GB/s at start"
        if end:
            s += f", {end['median_gbps']:.1f} GB/s at end"
        rows.append(["measured bandwidth", f"{s} ({bw['method']})"])
    load = res.get("load") or {}
    if load.get("others_cpu") is not None:
        oc = load["others_cpu"]
        rows.append(["other load", f"{oc:.0%} of the CPUs used by other processes during the run"
                     + (" (timings disturbed)" if oc >= BUSY else " (quiet)")])
    if res.get("wall_s"):
        rows.append(["wall time", f"{res['wall_s']:.0f} s"])
    return rows


def render_text(res: dict, markdown: bool) -> str:
    env = res["env"]
    out = []
    if markdown:
        out += ["# fused_wd benchmark", "", f"Command: `{env['command']}`", ""]
    out.append(table(["", ""], _header_rows(res), "ll"))
    out.append("")
    shown_notes = set()
    for case in res["cases"]:
        out.append(("## " if markdown else "== ") + case["title"])
        out.append("")
        if case.get("skipped"):
            out += [f"skipped: {case['skipped']}", ""]
            continue
        out.append(case_table(case, env))
        out.append("")
        out.append(case_caption(case))
        notes = [n for n in case_notes(case) if n not in shown_notes]
        shown_notes.update(notes)
        if notes:
            out.append("")
            out += [f"- {n}" for n in notes]
        out.append("")
    for title, t in sweep_tables(res["cases"], env):
        out += [("## Scaling: " if markdown else "== scaling: ") + title, "", t, ""]
    if res.get("e2e"):
        e = res["e2e"]
        trials = e["config"].get("trials", 1)
        out += [("## " if markdown else "== ") + f"End to end: {e['model']} ({fmt_count(e['nparams'])} params), "
                + (f"{trials} trials x " if trials > 1 else "")
                + f"{e['config']['repeats']} rounds x {e['config']['steps']} steps", "", e2e_table(e), ""]
        if e.get("others_cpu") is not None and e["others_cpu"] >= BUSY:
            out += [f"**other processes used {e['others_cpu']:.0%} of the CPUs meanwhile: timings disturbed**", ""]
    elif res.get("e2e_error"):
        out += [f"end to end: {res['e2e_error']}", ""]
    if markdown:
        if res.get("plot"):
            out += ["## Plot", "", f"![achieved bandwidth against parameter count]({res['plot']})", ""]
        out += ["## How to read this", "", *[f"- {line}" for line in legend(res)], ""]
    else:
        flagged = [(c["title"], n) for c in res["cases"] for n, r in c.get("impls", {}).items()
                   if r.get("check") and not r["check"]["ok"]]
        for t, n in flagged:
            out.append(f"MISMATCH: {n} disagrees with the oracle in '{t}'")
    if res.get("notices"):
        if markdown:
            out += ["## Notes", ""]
        for n in res["notices"]:
            out.append(("- " if markdown else "note: ") + n)
    return "\n".join(out).rstrip() + "\n"


def legend(res: dict) -> list:
    env = res["env"]
    gpu = env["device"].startswith("cuda")
    lines = [
        "Every implementation runs the whole optimizer step a training loop runs: torch and peer rows call "
        "`torch.nn.utils.clip_grad_norm_` and then `step()` when clipping is on; fused_wd clips inside `step()`.",
        "All implementations of a table live in one process and are timed A/B interleaved: each round runs every "
        "implementation for the same number of steps, in a rotating order, with the bandwidth probe among them. "
        "median / min-max are per step over the rounds, after warm-up" + (", with `torch.cuda.synchronize()` "
                                                                          "around each timed block." if gpu else "."),
        "GB/s = floor bytes per parameter (docs/design.md, 'The byte floor': Adam/AdamW 28, SGD with momentum 20, +4 with "
        "clipping; half that for bf16) x parameters / median step time. % BW is that against the stream "
        "bandwidth measured in the same rounds (" + ("device-to-device copy" if gpu else
                                                     "in-place `x.mul_` of all cores") + "); over 100% means the "
        "working set was partly cache-resident.",
        "x <baseline> = baseline median / this median: above 1 means faster than that baseline. "
        "(default) marks what torch.optim picks when foreach/fused are left unset on this device.",
        "extra MB = peak memory during one step above what was live before it: "
        + ("allocator peak (`torch.cuda.max_memory_allocated`)." if gpu else
           "resident-set high-water mark, reset before the step (`/proc/self/clear_refs`)."),
    ]
    if gpu:
        lines.append("launches = kernels, memcpys and memsets on the GPU during one step (torch.profiler).")
    lines.append(
        "check = after the timed steps, max |p - p_oracle| divided by the largest change the oracle made to any "
        "parameter; the oracle is fused_wd.reference (else torch's for-loop) run on the same inputs for the same "
        "number of steps. MISMATCH means above the tolerance (fp32 1e-3, bf16 0.25; torch for-loop/foreach "
        "compute in bf16 for bf16 params, so their bf16 tolerance is 1.0). For SGD, whose update scales with the "
        "clip factor, torch rows also carry the fp32 rounding of torch's gradient norm (about 2e-4 relative at 50M "
        "params on CPU).")
    return lines


def to_json(res: dict) -> str:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (torch.dtype, torch.device)):
            return str(o)
        return o
    return json.dumps(clean(dict(res, schema=SCHEMA)), indent=1)


def write_all(res: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "results.json")}
    with open(paths["markdown"], "w") as f:
        f.write(render_text(res, markdown=True))
    with open(paths["json"], "w") as f:
        f.write(to_json(res))
    return paths


__all__ = ["environment", "render_text", "write_all", "to_json", "table", "BASELINES"]
