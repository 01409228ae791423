"""Issue 6 study: a small MLP regression trained with fused_wd.AdamW in five
precision layouts; prints final loss against optimizer memory per parameter
(a markdown table) and, with matplotlib, saves the loss curves.

    python benchmarks/mixed_precision_study.py [--steps 2000] [--device cpu] [--out DIR]
"""
import argparse
import os

import torch

import fused_wd

CONFIGS = [  # name, param dtype, optimizer kwargs, optimizer bytes/param (state only)
    ("fp32", torch.float32, {}, 8),
    ("bf16, round-to-nearest", torch.bfloat16, {}, 4),
    ("bf16, stochastic rounding", torch.bfloat16, dict(stochastic_rounding=True, sr_seed=0), 4),
    ("bf16 + fp32 master", torch.bfloat16, dict(master_weights=True), 12),
    ("bf16 + fp32 master, bf16 states", torch.bfloat16,
     dict(master_weights=True, state_dtype=torch.bfloat16), 8),
    ("fp32, bf16 states", torch.float32, dict(state_dtype=torch.bfloat16), 4),
]


def run(dtype, kw, steps, device, lr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 1)).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=g)
    y = torch.sin(x @ torch.randn(32, 1, generator=g)) + 0.05 * torch.randn(4096, 1, generator=g)
    x, y = x.to(device), y.to(device)
    model = model.to(dtype)
    opt = fused_wd.AdamW(model.parameters(), lr=lr, weight_decay=0.01, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve = []
    for i in range(steps):
        idx = torch.randint(0, 4096, (128,), generator=g).to(device)
        opt.zero_grad()
        loss = ((model(x[idx].to(dtype)).float() - y[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
    with torch.no_grad():
        final = ((model(x.to(dtype)).float() - y) ** 2).mean().item()
    return curve, final


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows, curves = [], {}
    for name, dtype, kw, mem in CONFIGS:
        curve, final = run(dtype, kw, a.steps, a.device, a.lr)
        curves[name] = curve
        pbytes = 4 if dtype == torch.float32 else 2
        rows.append((name, mem, pbytes, final))
    print(f"{a.steps} steps, {a.device}, torch {torch.__version__}\n")
    print("| layout | optimizer B/param | param B/param | final train MSE |")
    print("| --- | ---: | ---: | ---: |")
    for name, mem, pbytes, final in rows:
        print(f"| {name} | {mem} | {pbytes} | {final:.5f} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib not installed: no figure)")
            return
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        k = max(1, a.steps // 100)
        for name, curve in curves.items():
            sm = torch.tensor(curve).unfold(0, k, k).mean(1)
            ax[0].plot(range(0, k * len(sm), k), sm, label=name)
        ax[0].set_yscale("log"); ax[0].set_xlabel("step"); ax[0].set_ylabel("train loss (smoothed)")
        ax[0].legend(fontsize=7)
        for name, mem, pbytes, final in rows:
            ax[1].scatter(mem + pbytes, final)
            ax[1].annotate(name, (mem + pbytes, final), fontsize=7)
        ax[1].set_xlabel("param + optimizer bytes/param"); ax[1].set_ylabel("final MSE"); ax[1].set_yscale("log")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "mixed_precision.png"), dpi=110)


if __name__ == "__main__":
    main()
