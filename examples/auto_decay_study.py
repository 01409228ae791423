"""Automatic weight decay on digits: are SWD and AWD less sensitive to their
coefficient than constant decoupled decay?

The claim of both papers (Xie et al. 2023, "scheduled" / AdamS; Ghiasi et
al. 2023, "adaptive" / AWD) is that an automatic decay needs less tuning of
its base coefficient. This study tests that on the model and data of
weight_decay_study.py (a 2-hidden-layer MLP on scikit-learn's digits, 30%
noisy training labels, cosine schedule, decay on the weight matrices): for
AdamW with constant decoupled decay and for the two automatic modes it
sweeps the base coefficient over four decades (nine points, a factor
sqrt(10) apart) at three learning rates, and reports per mode

  - the best final test accuracy, and at which coefficient;
  - the width of the near-best band: decades of coefficient whose accuracy
    is within 1 point of that lr's best (wider = less sensitive);
  - how far the best coefficient moves across the lrs (decades).

The modes' coefficients live on different scales (SWD divides by
sqrt(mean v_hat), about 2e-3 late in training; AWD multiplies by |g|/|p|,
0.01-0.1), so each grid is centred on a coefficient near the mode's best
(from a first sweep); the figure plots accuracy against the coefficient
relative to that centre.

    python examples/auto_decay_study.py              # ~10 min on 2 shared cores
    python examples/auto_decay_study.py --tiny       # seconds, a smoke test

Writes docs/figures/weight_decay_auto.png (with --figure) and
auto_summary.json in the output folder.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import fused_wd
except ImportError:          # a source checkout without installing: the repo root
    sys.path.insert(0, os.path.dirname(HERE))
    import fused_wd


def _study():
    spec = importlib.util.spec_from_file_location("weight_decay_study", os.path.join(HERE, "weight_decay_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _study()

MODES = ("decoupled", "scheduled", "adaptive")
LABELS = {"decoupled": "AdamW, constant (lr*wd)", "scheduled": "SWD (scheduled)",
          "adaptive": "AWD (adaptive)"}
COLORS = {"decoupled": "#1f77b4", "scheduled": "#2ca02c", "adaptive": "#d62728"}
# the centre of each mode's grid: near its best coefficient on this problem
# (a first sweep centred AWD at 300 and found its best at 30)
CENTRES = {"decoupled": 3.0, "scheduled": 6e-3, "adaptive": 30.0}
OFFSETS = [10 ** (k / 2) for k in range(-4, 5)]   # four decades, nine points


def make_opt(mode, model, lr, wd, max_grad_norm=None):
    groups = fused_wd.param_groups_for_decay(model, wd)
    return fused_wd.AdamW(groups, lr=lr, weight_decay_mode=mode, max_grad_norm=max_grad_norm)


def band_decades(accs, offsets, within=0.01):
    """Decades of coefficient (the grid's span between the outermost points)
    whose accuracy is within `within` of the row's best; a single point
    counts half a grid step."""
    best = max(accs)
    near = [math.log10(o) for a, o in zip(accs, offsets) if a >= best - within]
    step = math.log10(offsets[1] / offsets[0])
    return max(near) - min(near) + step


def run(cfg, lrs, offsets, data=None, progress=print):
    """The sweep: final test accuracy per mode, lr and coefficient (data:
    the digits unless given)."""
    data = data or study.load_digits_data(cfg.n_train, cfg.label_noise, cfg.seed)
    out = {}
    for mode in MODES:
        rows = []
        for lr in lrs:
            accs = []
            for o in offsets:
                r = study.train(data, mode, lr, CENTRES[mode] * o, cfg, record=False, make_opt=make_opt)
                accs.append(r["test_acc"])
            rows.append(accs)
            progress(f"  {mode:10s} lr={lr:g}: " + " ".join(f"{a:.3f}" for a in accs))
        out[mode] = dict(lrs=list(lrs), offsets=list(offsets), centre=CENTRES[mode], test_acc=rows)
    return out


def summarize(sweep):
    s = {}
    for mode, cell in sweep.items():
        offsets = cell["offsets"]
        best_rows = [max(range(len(r)), key=lambda j: (r[j], -j)) for r in cell["test_acc"]]
        bands = [band_decades(r, offsets) for r in cell["test_acc"]]
        best_off = [offsets[j] for j in best_rows]
        flat = [(a, i, j) for i, r in enumerate(cell["test_acc"]) for j, a in enumerate(r)]
        a, i, j = max(flat, key=lambda x: (x[0], -x[1], -x[2]))
        s[mode] = dict(best_test_acc=a, best_lr=cell["lrs"][i], best_wd=cell["centre"] * offsets[j],
                       band_decades_per_lr=bands, mean_band_decades=sum(bands) / len(bands),
                       best_wd_per_lr=[cell["centre"] * o for o in best_off],
                       best_wd_drift_decades=math.log10(max(best_off) / min(best_off)))
    return s


def plot(sweep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lrs = sweep[MODES[0]]["lrs"]
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.6), sharey=True)
    axes = axes if len(lrs) > 1 else [axes]
    for ax, (i, lr) in zip(axes, enumerate(lrs)):
        for mode, cell in sweep.items():
            ax.plot(cell["offsets"], [100 * a for a in cell["test_acc"][i]], "o-", color=COLORS[mode],
                    label=f"{LABELS[mode]} (centre {cell['centre']:g})")
        ax.set_xscale("log")
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("coefficient / centre")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("digits, 30% noisy labels: sensitivity to the decay coefficient", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="output folder (default examples/out/)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration")
    ap.add_argument("--figure", default=None, help="where to write the figure (png)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        cfg, lrs, offsets = study.tiny_config(), [1e-2], [0.1, 1.0, 10.0]
    else:
        cfg, lrs, offsets = study.full_config(), [1e-3, 4e-3, 1.6e-2], OFFSETS
    t0 = time.time()
    sweep = run(cfg, lrs, offsets)
    summary = summarize(sweep)
    for mode, v in summary.items():
        print(f"{LABELS[mode]:26s} best {100 * v['best_test_acc']:.1f}% (lr {v['best_lr']:g}, wd {v['best_wd']:.3g}); "
              f"near-best band {v['mean_band_decades']:.2f} decades (per lr "
              + ", ".join(f"{b:.1f}" for b in v["band_decades_per_lr"])
              + f"); best wd drifts {v['best_wd_drift_decades']:.1f} decades over the lrs")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "auto_summary.json"), "w") as f:
        json.dump(dict(sweep=sweep, summary=summary, wall_s=round(time.time() - t0)), f, indent=1)
    if args.figure:
        plot(sweep, args.figure)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
