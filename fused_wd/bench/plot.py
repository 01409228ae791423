"""PNG plot: achieved bandwidth against parameter count, one line per implementation,
the measured stream bandwidth (the floor) drawn; one panel per (preset, optimizer, clip, dtype)."""
from __future__ import annotations

import math

from .impls import IMPLS
from .presets import fmt_count

_STYLE = {
    "fused_wd": dict(color="#d62728", marker="o", lw=2.4, zorder=5),
    "torch-fused": dict(color="#1f77b4", marker="s"),
    "torch-foreach": dict(color="#2ca02c", marker="^"),
    "torch-forloop": dict(color="#9467bd", marker="v"),
    "reference": dict(color="#8c564b", marker="x", ls=":"),
    "deepspeed": dict(color="#ff7f0e", marker="D"),
    "apex": dict(color="#17becf", marker="P"),
}


def have_matplotlib() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def plot(res: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups: dict = {}
    for c in res["cases"]:
        if c.get("skipped") or "impls" not in c:
            continue
        groups.setdefault((c["preset"], c["optim"], c["clip"], c["dtype"]), []).append(c)
    if not groups:
        raise ValueError("nothing to plot")
    k = len(groups)
    ncol = min(k, 2)
    nrow = math.ceil(k / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.4 * nrow + 0.8), squeeze=False)
    env = res["env"]
    bw0 = (res.get("bandwidth") or {}).get("median_gbps")
    for ax, ((_preset, optim, clip, dtype), cs) in zip(axes.flat, groups.items()):
        cs = sorted(cs, key=lambda c: c["nparams"])
        xs_all = [c["nparams"] for c in cs]
        names = []
        for c in cs:
            names += [n for n, r in c["impls"].items() if "gbps" in r and n not in names]
        for n in names:
            pts = [(c["nparams"], c["impls"][n]["gbps"]) for c in cs if "gbps" in c["impls"].get(n, {})]
            if not pts:
                continue
            x, y = zip(*pts)
            st = dict(_STYLE.get(n, {}))
            st.setdefault("lw", 1.6)
            ax.plot(x, y, label=IMPLS[n].label if n in IMPLS else n, ms=6, **st)
            bad = [(c["nparams"], c["impls"][n]["gbps"]) for c in cs
                   if "gbps" in c["impls"].get(n, {}) and (c.get("others_cpu") or 0) >= 0.05]
            if bad:  # disturbed points drawn hollow
                bx, by = zip(*bad)
                ax.plot(bx, by, ls="none", marker=st.get("marker", "o"), ms=6, mfc="white",
                        mec=st.get("color", "black"), zorder=st.get("zorder", 2) + 0.1)
        probe = [(c["nparams"], c["bw_probe_gbps"]) for c in cs if c.get("bw_probe_gbps")]
        if probe:
            x, y = zip(*probe)
            ax.plot(x, y, color="black", ls="--", lw=1.4, marker="_", ms=14,
                    label="floor: stream bandwidth measured alongside")
        if bw0:
            ax.axhline(bw0, color="gray", ls=":", lw=1.2, label=f"stream bandwidth at start ({bw0:.0f} GB/s)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(set(xs_all)) == 1:
            x0 = xs_all[0]
            ax.set_xlim(x0 / 3, x0 * 3)
        ax.set_ylim(bottom=0)
        bpp = cs[0]["bytes_per_param"]
        ax.set_title(f"{optim}{' + clip' if clip else ''}, {dtype} ({bpp} B/param), {cs[0]['preset']} shapes",
                     fontsize=10)
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"achieved GB/s at {bpp} B/param")
        ax.grid(True, which="both", alpha=0.3)
        disturbed = [c for c in cs if (c.get("others_cpu") or 0) >= 0.05]
        if disturbed:
            ax.text(0.99, 0.02, f"hollow: {len(disturbed)} of {len(cs)} sizes disturbed by other processes",
                    transform=ax.transAxes, fontsize=7.5, color="#b00000", va="bottom", ha="right",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1.5))
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in list(axes.flat)[:k]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol_leg = min(4, len(labels))
    legend_rows = math.ceil(len(labels) / max(1, ncol_leg))
    fig.legend(handles, labels, loc="lower center", ncol=ncol_leg, fontsize=8, frameon=False)
    dev = env.get("device_name", env.get("device"))
    fig.suptitle(f"fused_wd benchmark on {dev} - torch {env['torch']} - {env['date'][:10]}", fontsize=11)
    bottom = (0.2 * legend_rows + 0.08) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
