"""What weight decay does, on real data, with fused_wd for every run.

A small MLP on scikit-learn's digits (1,797 8x8 images, shipped inside
scikit-learn: no download), trained on 256 images of which 30% carry a random
label (the test labels stay clean): without regularization it memorizes the
wrong labels (100% train accuracy) and loses ~10 points of test accuracy,
which weight decay wins back. On the clean labels weight decay barely moves
test accuracy for this model (at most ~1 point), hence the noise
(`--label-noise 0` to see that). Modes:

  none         Adam, no decay
  adam_l2      Adam, coupled L2:            g += wd * p
  adamw        AdamW, decoupled:            p *= 1 - lr * wd
  independent  AdamW, "independent":        p *= 1 - wd * lr / initial_lr
  corrected    AdamW, "corrected":          p *= 1 - wd * lr**2 / initial_lr
  cautious     AdamW, decoupled, cautious:  p *= 1 - lr * wd where update * p >= 0
  sgd_l2       SGD + momentum 0.9, L2:      g += wd * p
  adam_l1      Adam, coupled L1:            g += wd * sign(p)
  l1_proximal  Adam, proximal L1:           p = sign(p) * max(|p| - lr * wd, 0) after the update

Decay goes to the weight matrices only (`fused_wd.param_groups_for_decay`);
biases are not decayed. The learning rate follows a cosine schedule, so for
"independent" the per-step shrink is `wd * schedule(t)`, the decay of
Loshchilov & Hutter's AdamW (their Algorithm 2), and not `lr * wd`.

It sweeps learning rate x decay for every mode but "none" and writes to
--out (default examples/out/):

  curves.png         train/test loss and accuracy, each mode at its best wd for one lr
  heatmaps.png       final test accuracy over (lr x wd), one panel per mode
  weight_norms.png   norm of the decayed weights over training, per mode
  grad_norms.png     global gradient norm with and without clipping (AdamW, SGD)
  variants.png       AdamW against its corrected and cautious variants: test
                     accuracy over wd at the reference lr, weight norm over training
  sparsity.png       Adam with L2, L1 and proximal L1 over a range of wd at the
                     reference lr: the share of exact zeros in the weight matrices
                     and test accuracy
  summary.json       every number behind the plots

    pip install -e ".[examples]"        # scikit-learn, matplotlib
    python examples/weight_decay_study.py              # full run, ~5 min on 2 shared cores
    python examples/weight_decay_study.py --tiny       # seconds, a smoke test

Every function takes plain tensors, so the tests run it on synthetic data
without scikit-learn.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

try:
    import fused_wd
except ImportError:          # run from a source checkout without installing: the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_wd

MODES = ("none", "adam_l2", "adamw", "independent", "corrected", "cautious", "sgd_l2", "adam_l1",
         "l1_proximal")
SWEPT = ("adam_l2", "adamw", "independent", "corrected", "cautious", "sgd_l2")
# the decoupled variants compared in variants.png
VARIANTS = ("adamw", "corrected", "cautious")
# the modes of sparsity.png, swept over wd at the reference lr
SPARSE = ("adam_l2", "adam_l1", "l1_proximal")
# |w| below this counts as near zero (summary only; the figure counts exact zeros)
NEAR_ZERO = 1e-3
LABELS = {
    "none": "Adam, no decay",
    "adam_l2": "Adam + L2 (coupled)",
    "adamw": "AdamW (decoupled, lr*wd)",
    "independent": "AdamW, independent (wd*lr/lr0)",
    "corrected": "AdamW, corrected (wd*lr^2/lr0)",
    "cautious": "AdamW, cautious (lr*wd, masked)",
    "sgd_l2": "SGD momentum 0.9 + L2",
    "adam_l1": "Adam + L1 (coupled)",
    "l1_proximal": "Adam, proximal L1",
}
COLORS = {"none": "#444444", "adam_l2": "#d62728", "adamw": "#1f77b4",
          "independent": "#2ca02c", "corrected": "#9467bd", "cautious": "#8c564b",
          "sgd_l2": "#ff7f0e", "adam_l1": "#e377c2", "l1_proximal": "#17becf"}
DOTTED = ("independent", "corrected", "cautious")


@dataclasses.dataclass
class Config:
    """One study. `lrs` and `wds` are the sweep grids per mode (a wd of 0 is
    added to every grid as the no-decay column)."""
    n_train: int = 256
    label_noise: float = 0.3  # share of training labels replaced by a random class
    hidden: int = 256
    batch_size: int = 32
    steps: int = 500
    eval_every: int = 20
    seed: int = 0
    lrs: Dict[str, List[float]] = dataclasses.field(default_factory=lambda: {
        "adam": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
        "sgd": [0.02, 0.04, 0.08, 0.16, 0.32],
    })
    wds: Dict[str, List[float]] = dataclasses.field(default_factory=lambda: {
        "adam_l2": [1e-3, 3e-3, 1e-2, 3e-2, 0.1],
        "adamw": [0.3, 1.0, 3.0, 10.0, 30.0],
        "independent": [1e-3, 3e-3, 1e-2, 3e-2, 0.1],
        "corrected": [0.3, 1.0, 3.0, 10.0, 30.0],
        "cautious": [1.0, 3.0, 10.0, 30.0, 100.0],
        "sgd_l2": [1e-3, 3e-3, 1e-2, 3e-2, 0.1],
    })
    # the wd grids of sparsity.png (at ref_lr["adam"]; a run without decay is added)
    sparse_wds: Dict[str, List[float]] = dataclasses.field(default_factory=lambda: {
        "adam_l2": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3],
        "adam_l1": [1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 1e-2],
        "l1_proximal": [0.01, 0.03, 0.1, 0.2, 0.3, 0.5],
    })
    # the lr of the curves, weight-norm and clipping runs (each mode at its best wd there)
    ref_lr: Dict[str, float] = dataclasses.field(default_factory=lambda: {"adam": 4e-3, "sgd": 0.08})
    clip_norm: float = 0.5   # max_grad_norm of the clipped runs of grad_norms.png


def full_config():
    return Config()


def tiny_config():
    return Config(n_train=64, hidden=32, batch_size=16, steps=40, eval_every=10,
                  lrs={"adam": [1e-3, 1e-2], "sgd": [0.03, 0.3]},
                  wds={"adam_l2": [0.1], "adamw": [3.0], "independent": [3e-2], "corrected": [3.0],
                       "cautious": [3.0], "sgd_l2": [3e-2]},
                  sparse_wds={"adam_l2": [0.1], "adam_l1": [1e-2], "l1_proximal": [0.3, 3.0]},
                  ref_lr={"adam": 1e-2, "sgd": 0.3})


# ------------------------------------------------------------------ data

@dataclasses.dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self):
        return self.x_train.shape[1]

    @property
    def n_classes(self):
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits_data(n_train=256, label_noise=0.0, seed=0):
    """scikit-learn's digits, pixels scaled to [0, 1], `n_train` random
    images for training and the rest (1,797 - n_train) for testing. A share
    `label_noise` of the training labels is replaced by a uniformly random
    class (test labels stay clean)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return with_label_noise(Data(x[tr], y[tr], x[te], y[te]), label_noise, seed)


def with_label_noise(data, share, seed=0):
    """`data` with a share of its training labels replaced by random classes."""
    if share <= 0:
        return data
    g = torch.Generator().manual_seed(seed + 2)
    y = data.y_train.clone()
    flip = torch.rand(len(y), generator=g) < share
    y[flip] = torch.randint(0, data.n_classes, (int(flip.sum()),), generator=g)
    return Data(data.x_train, y, data.x_test, data.y_test)


def synthetic_data(n_train=64, n_test=256, n_features=16, n_classes=4, seed=0):
    """Gaussian blobs with label noise: a stand-in for the tests (no sklearn)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, n_features, generator=g)
    n = n_train + n_test
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centers[y] + 1.5 * torch.randn(n, n_features, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, n_classes, (n,), generator=g), y)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


# ------------------------------------------------------------------ model, optimizer

def make_model(n_features, n_classes, hidden, seed=0):
    """A two-hidden-layer ReLU MLP, the same init for a given seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, n_classes))


def make_optimizer(mode, model, lr, wd, max_grad_norm=None):
    """The fused_wd optimizer of `mode`, decaying weight matrices only."""
    groups = fused_wd.param_groups_for_decay(model, 0.0 if mode == "none" else wd)
    kw = dict(lr=lr, max_grad_norm=max_grad_norm)
    if mode in ("none", "adam_l2"):
        return fused_wd.Adam(groups, **kw)                       # "l2" is Adam's default
    if mode == "adamw":
        return fused_wd.AdamW(groups, **kw)                      # "decoupled" is AdamW's default
    if mode in ("independent", "corrected"):
        return fused_wd.AdamW(groups, weight_decay_mode=mode, **kw)
    if mode == "cautious":
        return fused_wd.AdamW(groups, cautious_weight_decay=True, **kw)
    if mode == "sgd_l2":
        return fused_wd.SGD(groups, momentum=0.9, **kw)          # "l2" is SGD's default
    if mode == "adam_l1":
        return fused_wd.Adam(groups, weight_decay_mode="l1", **kw)
    if mode == "l1_proximal":
        return fused_wd.Adam(groups, weight_decay_mode="l1_proximal", **kw)
    raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


@torch.no_grad()
def evaluate(model, x, y):
    out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(data, mode, lr, wd, cfg, max_grad_norm=None, record=True, make_opt=None):
    """Trains one model; returns a dict of its history (lists) and final metrics.
    `make_opt(mode, model, lr, wd, max_grad_norm)` builds the optimizer
    (default: make_optimizer).

    With `record`, the history holds, every `cfg.eval_every` steps, the
    train/test loss and accuracy and the norm of the weight matrices (the
    decayed params), and at every step the global gradient norm: the pre-clip
    norm `opt.last_grad_norm` for a clipped run, the same norm computed with
    `fused_wd.multi_tensor_norm` otherwise (kept as tensors until the end, so
    no host sync per step)."""
    model = make_model(data.n_features, data.n_classes, cfg.hidden, cfg.seed)
    opt = (make_opt or make_optimizer)(mode, model, lr, wd, max_grad_norm)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps)))
    weights = [p for p in model.parameters() if p.dim() >= 2]
    gen = torch.Generator().manual_seed(cfg.seed + 1)      # same batch order in every run
    n = len(data.y_train)
    hist = {k: [] for k in ("step", "train_loss", "train_acc", "test_loss", "test_acc", "weight_norm")}
    grad_norms = []

    def log(step):
        hist["step"].append(step)
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            loss, acc = evaluate(model, x, y)
            hist[f"{split}_loss"].append(loss)
            hist[f"{split}_acc"].append(acc)
        hist["weight_norm"].append(fused_wd.multi_tensor_norm([w.detach() for w in weights]).item())

    perm, pos = None, n
    for step in range(cfg.steps):
        if record and step % cfg.eval_every == 0:
            log(step)
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if record and max_grad_norm is None:
            grad_norms.append(fused_wd.multi_tensor_norm([p.grad for p in model.parameters()]))
        opt.step()
        if record and max_grad_norm is not None:
            grad_norms.append(opt.last_grad_norm.detach().clone())
        sched.step()
    log(cfg.steps)
    result = {k: v[-1] for k, v in hist.items() if k != "step"}
    numel = sum(w.numel() for w in weights)
    result.update(mode=mode, lr=lr, wd=wd, max_grad_norm=max_grad_norm,
                  zero_fraction=sum(int((w == 0).sum()) for w in weights) / numel,
                  near_zero_fraction=sum(int((w.abs() < NEAR_ZERO).sum()) for w in weights) / numel)
    if record:
        result["history"] = hist
        result["grad_norm"] = torch.stack(grad_norms).tolist()
    return result


# ------------------------------------------------------------------ sweep

def sweep(data, cfg, modes=SWEPT, progress=None):
    """Final test accuracy (and weight norm) over lr x [0] + wds[mode] for each
    mode. The wd = 0 column of the three Adam modes is one shared run per lr
    (with no decay they are the same optimizer)."""
    out, no_decay = {}, {}
    for mode in modes:
        family = "sgd" if mode == "sgd_l2" else "adam"
        lrs, wds = cfg.lrs[family], [0.0] + list(cfg.wds[mode])
        acc = [[0.0] * len(wds) for _ in lrs]
        wnorm = [[0.0] * len(wds) for _ in lrs]
        for i, lr in enumerate(lrs):
            for j, wd in enumerate(wds):
                key = (family, lr)
                if wd == 0.0 and key in no_decay:
                    r = no_decay[key]
                else:
                    r = train(data, "sgd_l2" if family == "sgd" else ("none" if wd == 0.0 else mode),
                              lr, wd, cfg, record=False)
                    if wd == 0.0:
                        no_decay[key] = r
                acc[i][j], wnorm[i][j] = r["test_acc"], r["weight_norm"]
            if progress:
                progress(f"  {mode:12s} lr={lr:g}: " + " ".join(f"{a:.3f}" for a in acc[i]))
        out[mode] = dict(lrs=list(lrs), wds=wds, test_acc=acc, weight_norm=wnorm)
    return out


def sparsity_sweep(data, cfg, progress=None):
    """Adam with L2, L1 and proximal L1 at the reference lr over
    `cfg.sparse_wds` (and wd = 0): final test accuracy, weight norm and the
    share of exact zeros (and of |w| < NEAR_ZERO) in the weight matrices
    (the decayed params)."""
    lr = cfg.ref_lr["adam"]
    base = train(data, "none", lr, 0.0, cfg, record=False)
    out = {}
    for mode in SPARSE:
        rs = [base] + [train(data, mode, lr, wd, cfg, record=False) for wd in cfg.sparse_wds[mode]]
        out[mode] = {"lr": lr, "wds": [r["wd"] for r in rs],
                     **{k: [r[k] for r in rs] for k in ("test_acc", "zero_fraction", "near_zero_fraction",
                                                        "weight_norm")}}
        if progress:
            progress(f"  {mode:12s} lr={lr:g}: " + " ".join(
                f"wd={r['wd']:g} {100 * r['test_acc']:.1f}%/{100 * r['zero_fraction']:.1f}% zeros" for r in rs))
    return out


def best_setting(cell):
    """(lr, wd, acc) of the best cell of one mode's sweep, first on ties."""
    best = max(((a, -i, -j) for i, row in enumerate(cell["test_acc"]) for j, a in enumerate(row)))
    a, i, j = best[0], -best[1], -best[2]
    return cell["lrs"][i], cell["wds"][j], a


def interaction_share(acc):
    """How far a (lr x wd) accuracy map is from separable: the share of its
    variance (around the grand mean) that an additive model row + column
    effect does not explain (two-way ANOVA interaction / total). 0 means the
    best wd is the same at every lr; a diagonal ridge gives a large share."""
    a = torch.tensor(acc, dtype=torch.float64)
    r = a - a.mean(1, keepdim=True) - a.mean(0, keepdim=True) + a.mean()
    tot = ((a - a.mean()) ** 2).sum()
    return float((r ** 2).sum() / tot) if tot > 0 else 0.0


def best_wd_per_lr(cell):
    """The wd with the best test accuracy at each lr (a ridge that moves with
    lr is the coupling of Figure 2)."""
    return [cell["wds"][max(range(len(row)), key=lambda j: (row[j], -j))] for row in cell["test_acc"]]


def ridge_drift(cell):
    """Decades spanned by the best nonzero wd over the lr rows: 0 when the
    best wd does not move with lr (separable), about log10(lr range) when it
    moves in proportion to lr (a diagonal ridge). None when fewer than one row
    prefers some decay."""
    best = [w for w in best_wd_per_lr(cell) if w > 0]
    return math.log10(max(best) / min(best)) if best else None


def best_wd_at(cell, lr):
    """(wd, acc) of the best cell in the row of `lr`."""
    i = cell["lrs"].index(lr)
    row = cell["test_acc"][i]
    j = max(range(len(row)), key=lambda j: (row[j], -j))
    return cell["wds"][j], row[j]


# ------------------------------------------------------------------ plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(mode, r):
    return f"{LABELS[mode]} (lr={r['lr']:g}, wd={r['wd']:g})"


def plot_curves(runs, path):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6), sharex=True)
    keys = ("train_loss", "test_loss", "train_acc", "test_acc")
    for mode, r in runs.items():
        h = r["history"]
        for ax, key in zip(axes.flat, keys):
            ax.plot(h["step"], h[key], color=COLORS[mode], label=_label(mode, r), lw=1.5,
                    ls=":" if mode in DOTTED else "-")
    for ax, key in zip(axes.flat, ("train loss (noisy labels)", "test loss", "train accuracy (noisy labels)",
                                   "test accuracy")):
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.set_yscale("log")
    for ax, key in zip(axes[1], keys[2:]):
        tail = [a for r in runs.values() for a in r["history"][key][len(r["history"][key]) // 5:]]
        ax.set_ylim(max(0.0, min(tail) - 0.03), min(1.0, max(tail) + 0.02))
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    lr_adam, lr_sgd = runs["none"]["lr"], runs.get("sgd_l2", runs["none"])["lr"]
    fig.suptitle(f"Each mode at its best weight_decay for lr = {lr_adam:g} (SGD: lr = {lr_sgd:g}); "
                 "training labels partly noisy, test labels clean", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_heatmaps(sw, path):
    plt = _plt()
    modes = [m for m in SWEPT if m in sw]
    allacc = [a for m in modes for row in sw[m]["test_acc"] for a in row]
    vmax = max(allacc)
    vmin = max(min(allacc), vmax - 0.3)
    ncol = min(len(modes), 3)
    nrow = (len(modes) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol + 0.8, 3.9 * nrow), constrained_layout=True,
                             squeeze=False)
    for ax in axes.flat[len(modes):]:
        ax.axis("off")
    axes = list(axes.flat)[:len(modes)]
    for ax, mode in zip(axes, modes):
        c = sw[mode]
        acc = c["test_acc"]
        im = ax.imshow(acc, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(c["wds"])))
        ax.set_xticklabels([f"{w:g}" for w in c["wds"]], rotation=45, fontsize=7)
        ax.set_yticks(range(len(c["lrs"])))
        ax.set_yticklabels([f"{lr:g}" for lr in c["lrs"]], fontsize=7)
        ax.axvline(0.5, color="white", lw=1.5)
        best = max(max(row) for row in acc)
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if a > vmin + 0.6 * (vmax - vmin) else "white",
                        fontweight="bold" if a == best else "normal")
            jb = max(range(len(row)), key=lambda j: (row[j], -j))
            ax.add_patch(plt.Rectangle((jb - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.3))
        ax.set_xlabel("weight_decay", fontsize=8)
        d = ridge_drift(c)
        drift = "" if d is None else f"best wd moves {d:.1f} decades"
        ax.set_title(f"{LABELS[mode]}\n{drift}", fontsize=8.5)
    for ax in axes[::ncol]:
        ax.set_ylabel("learning rate", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.9, pad=0.01, label="final test accuracy")
    fig.suptitle("Test accuracy (%) over lr x weight_decay; red box: best wd at each lr; "
                 "left of the white line: no decay", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_weight_norms(runs, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode, r in runs.items():
        h = r["history"]
        ax.plot(h["step"], h["weight_norm"], color=COLORS[mode], lw=1.6, label=_label(mode, r),
                ls=":" if mode in DOTTED else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("||W||, all weight matrices (the decayed params)")
    ax.set_title("Weight norm under each mode (the runs of the curves figure)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_grad_norms(clip_runs, path):
    plt = _plt()
    fig, axes = plt.subplots(1, len(clip_runs), figsize=(5.2 * len(clip_runs), 4.0), squeeze=False)
    for ax, (mode, pair) in zip(axes[0], clip_runs.items()):
        for (name, r), color in zip(pair.items(), ("#1f77b4", "#d62728")):
            g = torch.tensor(r["grad_norm"])
            steps = torch.arange(len(g))
            ax.plot(steps, g, color=color, alpha=0.3, lw=0.7)
            k = 15
            smooth = F.avg_pool1d(g[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
            ax.plot(steps[:len(smooth)], smooth, color=color, lw=1.6,
                    label=f"{name}: test acc {100 * r['test_acc']:.1f}%, ||W|| {r['weight_norm']:.1f}")
        mx = pair["clipped"]["max_grad_norm"]
        ax.axhline(mx, color="black", ls="--", lw=1, label=f"max_grad_norm = {mx:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        r = pair["clipped"]
        ax.set_title(f"{LABELS[mode]}, lr={r['lr']:g}, wd={r['wd']:g}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("global gradient norm, pre-clip")
    fig.suptitle("Gradient norm with and without clipping (opt.last_grad_norm; 15-step mean in bold)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_variants(sw, runs, path):
    """AdamW against its corrected and cautious variants: final test
    accuracy over wd in the sweep's row of the reference lr, and the weight
    norm over training of each at its best wd there."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.2))
    lr = runs["adamw"]["lr"]
    for mode in VARIANTS:
        c = sw[mode]
        row = c["test_acc"][c["lrs"].index(lr)]
        wds = c["wds"][1:]
        a0.plot(wds, [100 * a for a in row[1:]], "o-", color=COLORS[mode], label=LABELS[mode], lw=1.5)
        h = runs[mode]["history"]
        a1.plot(h["step"], h["weight_norm"], color=COLORS[mode], lw=1.6, label=_label(mode, runs[mode]),
                ls=":" if mode in DOTTED else "-")
    a0.axhline(100 * sw["adamw"]["test_acc"][sw["adamw"]["lrs"].index(lr)][0], color=COLORS["none"],
               ls="--", lw=1, label="no decay")
    a0.set_xscale("log")
    a0.set_xlabel("weight_decay")
    a0.set_ylabel("final test accuracy (%)")
    a0.set_title(f"Test accuracy over weight_decay at lr = {lr:g} (cosine schedule)", fontsize=9)
    h = runs["none"]["history"]
    a1.plot(h["step"], h["weight_norm"], color=COLORS["none"], lw=1.2, label="Adam, no decay")
    a1.set_xlabel("step")
    a1.set_ylabel("||W||, all weight matrices")
    a1.set_title("Weight norm, each variant at its best wd there", fontsize=9)
    for ax in (a0, a1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_sparsity(sp, path):
    """Test accuracy and the share of exact zeros in the weight matrices over
    wd, and accuracy against that share, for L2, L1 and proximal L1 under
    Adam."""
    plt = _plt()
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(14, 4.2))
    none = [LABELS[m] for m, c in sp.items() if not any(c["zero_fraction"])]
    for mode, c in sp.items():
        wds, acc, zf = c["wds"][1:], c["test_acc"][1:], c["zero_fraction"][1:]
        a0.plot(wds, [100 * a for a in acc], "o-", color=COLORS[mode], label=LABELS[mode], lw=1.5)
        a1.plot(wds, [100 * z for z in zf], "o-", color=COLORS[mode], label=LABELS[mode], lw=1.5)
        if any(zf):
            a2.plot([100 * z for z in zf], [100 * a for a in acc], "o-", color=COLORS[mode], label=LABELS[mode],
                    lw=1.5)
            for w, z, a in zip(wds, zf, acc):
                a2.annotate(f"wd {w:g}", (100 * z, 100 * a), fontsize=7, xytext=(3, -9),
                            textcoords="offset points", color=COLORS[mode])
    c = next(iter(sp.values()))
    for ax in (a0, a2):
        ax.axhline(100 * c["test_acc"][0], color=COLORS["none"], ls="--", lw=1, label="no decay")
    for ax in (a0, a1):
        ax.set_xscale("log")
        ax.set_xlabel("weight_decay")
    a0.set_ylabel("final test accuracy (%)")
    a0.set_title(f"Test accuracy over weight_decay, lr = {c['lr']:g} (cosine schedule)", fontsize=9)
    a1.set_ylabel("exact zeros in the weight matrices (%)")
    a1.set_title("Share of weights exactly 0 after training", fontsize=9)
    a2.set_xlabel("exact zeros in the weight matrices (%)")
    a2.set_ylabel("final test accuracy (%)")
    a2.set_title("Test accuracy against exact zeros" + (f"\n(no exact zeros: {', '.join(none)})" if none else ""),
                 fontsize=9)
    for ax in (a0, a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------ study

def run_study(cfg, out, data=None, plots=True, progress=print):
    """Runs the sweep, then each mode at its best wd for the reference lr
    (curves, weight norms) and AdamW and SGD with and without clipping, on
    `data` (digits when None); writes the plots and summary.json to `out` and
    returns the summary dict."""
    progress = progress or (lambda s: None)
    t0 = time.perf_counter()
    if data is None:
        data = load_digits_data(cfg.n_train, cfg.label_noise, cfg.seed)
    os.makedirs(out, exist_ok=True)
    progress(f"data: {len(data.y_train)} train, {len(data.y_test)} test; "
             f"MLP {data.n_features}-{cfg.hidden}-{cfg.hidden}-{data.n_classes}; {cfg.steps} steps per run")
    sw = sweep(data, cfg, progress=progress)
    sp = sparsity_sweep(data, cfg, progress=progress)

    family = lambda m: "sgd" if m == "sgd_l2" else "adam"  # noqa: E731
    settings = {"none": (cfg.ref_lr["adam"], 0.0)}
    for mode in SWEPT:
        lr = cfg.ref_lr[family(mode)]
        settings[mode] = (lr, best_wd_at(sw[mode], lr)[0])
    runs = {mode: train(data, mode, lr, wd, cfg) for mode, (lr, wd) in settings.items()}
    clip_runs = {}
    for mode in ("adamw", "sgd_l2"):
        lr, wd = settings[mode]
        clip_runs[mode] = {"no clipping": runs[mode],
                           "clipped": train(data, mode, lr, wd, cfg, max_grad_norm=cfg.clip_norm)}

    files = {}
    if plots:
        files = {"curves": "curves.png", "heatmaps": "heatmaps.png",
                 "weight_norms": "weight_norms.png", "grad_norms": "grad_norms.png",
                 "variants": "variants.png", "sparsity": "sparsity.png"}
        plot_curves(runs, os.path.join(out, files["curves"]))
        plot_heatmaps(sw, os.path.join(out, files["heatmaps"]))
        plot_weight_norms(runs, os.path.join(out, files["weight_norms"]))
        plot_grad_norms(clip_runs, os.path.join(out, files["grad_norms"]))
        plot_variants(sw, runs, os.path.join(out, files["variants"]))
        plot_sparsity(sp, os.path.join(out, files["sparsity"]))

    best = {"none": dict(zip(("lr", "wd", "test_acc"), best_setting(
        dict(sw["adam_l2"], wds=[0.0], test_acc=[[row[0]] for row in sw["adam_l2"]["test_acc"]]))))}
    best.update({m: dict(zip(("lr", "wd", "test_acc"), best_setting(sw[m]))) for m in SWEPT})
    summary = {
        "config": dataclasses.asdict(cfg),
        "data": {"n_train": len(data.y_train), "n_test": len(data.y_test)},
        "best_in_sweep": best,
        "at_ref_lr": {m: {"lr": r["lr"], "wd": r["wd"], "test_acc": r["test_acc"],
                          "test_loss": r["test_loss"], "train_acc": r["train_acc"],
                          "weight_norm": r["weight_norm"]} for m, r in runs.items()},
        "heatmap_interaction_share": {m: interaction_share(sw[m]["test_acc"]) for m in sw},
        "best_wd_per_lr": {m: best_wd_per_lr(sw[m]) for m in sw},
        "ridge_drift_decades": {m: ridge_drift(sw[m]) for m in sw},
        "sweep": sw,
        "sparsity": sp,
        "clipping": {m: {k: {"test_acc": r["test_acc"], "max_grad_norm": r["max_grad_norm"],
                             "median_grad_norm": float(torch.tensor(r["grad_norm"]).median()),
                             "weight_norm": r["weight_norm"]} for k, r in pair.items()}
                     for m, pair in clip_runs.items()},
        "runs": {m: {k: r[k] for k in ("history", "lr", "wd")} for m, r in runs.items()},
        "files": files,
    }
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    progress(format_summary(summary))
    return summary


def format_summary(s):
    lines = ["best final test accuracy in the sweep, per mode:"]
    for m, b in s["best_in_sweep"].items():
        lines.append(f"  {LABELS[m]:34s} {100 * b['test_acc']:5.1f}%  (lr={b['lr']:g}, wd={b['wd']:g})")
    lines.append("at the reference lr, each mode at its best wd there:")
    for m, b in s["at_ref_lr"].items():
        lines.append(f"  {LABELS[m]:34s} {100 * b['test_acc']:5.1f}%  (lr={b['lr']:g}, wd={b['wd']:g}; "
                     f"train acc {100 * b['train_acc']:.1f}%, ||W||={b['weight_norm']:.1f})")
    lines.append("heat maps: best wd at each lr (low to high), its drift in decades, interaction share:")
    for m, v in s["heatmap_interaction_share"].items():
        d = s["ridge_drift_decades"][m]
        lines.append(f"  {m:12s} {s['best_wd_per_lr'][m]}  drift {'-' if d is None else f'{d:.2f}'}  "
                     f"interaction {100 * v:.0f}%")
    for m, pair in s["clipping"].items():
        lines.append(f"clipping, {m}: " + "; ".join(
            f"{k}: test acc {100 * v['test_acc']:.1f}%, median pre-clip norm {v['median_grad_norm']:.3f}"
            for k, v in pair.items()))
    lines.append(f"sparsity at the reference lr (wd: test acc / exact zeros / |w| < {NEAR_ZERO:g}, in the "
                 "weight matrices):")
    for m, c in s["sparsity"].items():
        lines.append(f"  {m:12s} " + "; ".join(
            f"{w:g}: {100 * a:.1f}% / {100 * z:.1f}% / {100 * nz:.1f}%" for w, a, z, nz in
            zip(c["wds"], c["test_acc"], c["zero_fraction"], c["near_zero_fraction"])))
    lines.append(f"wall time {s['wall_s']} s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                    help="output folder (default examples/out/)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration")
    ap.add_argument("--label-noise", type=float, default=None,
                    help="share of training labels made random (default 0.3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = tiny_config() if args.tiny else full_config()
    if args.label_noise is not None:
        cfg.label_noise = args.label_noise
    run_study(cfg, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
