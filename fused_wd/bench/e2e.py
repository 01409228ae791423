"""End-to-end: training steps per second of a small GPT built in code, on random tokens.

Each contender trains its own copy of the same model (same initial weights,
same batches): forward, backward, then the optimizer part that differs:

- torch AdamW (torch's default for this device: for-loop on CPU, foreach on
  GPU) after ``torch.nn.utils.clip_grad_norm_``;
- torch AdamW(fused=True) after ``clip_grad_norm_``;
- ``fused_wd.AdamW(max_grad_norm=...)``: clipping inside the step;
- the same with ``norm_in_backward=True``: the norm gathered during backward;
- ``fused_wd.AdamW`` without clipping: what a clipped step should cost.

Rounds are interleaved like the optimizer tables; the median over rounds is
reported, with the time of the optimizer part measured inside the same loop.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bandwidth import sync
from .impls import import_fused_wd, torch_default_variant


@dataclass
class E2EConfig:
    vocab: int = 4096
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    seq: int = 64
    batch: int = 4
    steps: int = 3      # steps per timed round
    repeats: int = 5
    warmup: int = 2
    trials: int = 1     # fresh model copies, each warmed up and run for `repeats` rounds
    twin: bool = False  # a second unclipped fused_wd loop; the reference is then their mean
    max_grad_norm: float = 1.0
    lr: float = 3e-4
    weight_decay: float = 0.1


PRESETS = {
    "tiny": E2EConfig(vocab=256, d_model=32, n_layer=2, n_head=2, seq=16, batch=2, steps=2, repeats=2, warmup=1),
    "cpu": E2EConfig(),
    "quick": E2EConfig(steps=2, repeats=3, warmup=1),
    "gpu": E2EConfig(vocab=32000, d_model=768, n_layer=6, n_head=12, seq=256, batch=8, steps=10, repeats=5,
                     warmup=3),
}


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: E2EConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def _contenders(cfg: E2EConfig, device: torch.device):
    """name -> (label, make(model) -> optimizer part callable)."""
    out = {}
    default = torch_default_variant(device.type)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)

    def torch_make(extra):
        def make(m):
            params = [p for p in m.parameters()]
            opt = torch.optim.AdamW(params, **kw, **extra)

            def opt_part():
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
            return opt, opt_part
        return make

    out["torch-default"] = (f"torch AdamW (default: {default}) + clip_grad_norm_", torch_make({}))
    out["torch-fused"] = ("torch AdamW(fused=True) + clip_grad_norm_", torch_make({"fused": True}))
    fw = import_fused_wd()
    if fw is not None:
        def fw_make(**extra):
            def make(m):
                opt = fw.AdamW(m.parameters(), **kw, **extra)
                return opt, opt.step
            return make
        out["fused_wd"] = ("fused_wd.AdamW(max_grad_norm=...)",
                           fw_make(max_grad_norm=cfg.max_grad_norm))
        out["fused_wd-nib"] = ("fused_wd.AdamW(max_grad_norm=..., norm_in_backward=True)",
                               fw_make(max_grad_norm=cfg.max_grad_norm, norm_in_backward=True))
        out["fused_wd-noclip"] = ("fused_wd.AdamW, no clipping (the floor of a clipped step)",
                                  fw_make())
        if cfg.twin:
            out["fused_wd-noclip-twin"] = ("fused_wd.AdamW, no clipping, a second copy (the noise floor)",
                                           fw_make())
    return out


def run_e2e(device: torch.device, cfg: E2EConfig, progress=None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    base = TinyGPT(cfg).to(device)
    nparams = sum(p.numel() for p in base.parameters())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    n_batches = 4
    data = torch.randint(0, cfg.vocab, (n_batches, cfg.batch, cfg.seq + 1), generator=gen, device=device)

    contenders = _contenders(cfg, device)
    names = list(contenders)
    step_s = {n: [] for n in names}
    opt_s = {n: [] for n in names}
    losses = {}

    def train_steps(r, k, timed_opt):
        m = r["model"]
        opt_t = 0.0
        for _ in range(k):
            batch = data[r["i"] % n_batches]
            r["i"] += 1
            logits = m(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
            for p in m.parameters():
                p.grad = None
            loss.backward()
            if timed_opt:
                sync(device)
                t0 = time.perf_counter()
            r["opt_part"]()
            if timed_opt:
                sync(device)
                opt_t += time.perf_counter() - t0
        losses[r["name"]] = float(loss.detach())
        return opt_t

    timed_opt = device.type == "cpu"  # on GPU the extra syncs would distort the loop

    def run_trial(trial):
        # Fresh copies per trial (made in a rotated order): where a copy's
        # memory lands stays with it, so it must vary across trials. (A
        # function of its own: its copies are freed before the next trial's.)
        runners = []
        for name in names[trial % len(names):] + names[:trial % len(names)]:
            m = copy.deepcopy(base)
            opt, opt_part = contenders[name][1](m)
            runners.append({"name": name, "model": m, "opt": opt, "opt_part": opt_part, "i": 0})
        runners.sort(key=lambda r: names.index(r["name"]))
        for r in runners:
            if progress:
                progress.set(f"end-to-end: warm up {r['name']}")
            train_steps(r, cfg.warmup, False)
        if progress:
            progress.update(1)
        for rep in range(cfg.repeats):
            if progress:
                progress.set(f"end-to-end: round {rep + 1}/{cfg.repeats}"
                             + (f", trial {trial + 1}/{cfg.trials}" if cfg.trials > 1 else ""))
            k = rep % len(runners)
            for r in runners[k:] + runners[:k]:
                sync(device)
                t0 = time.perf_counter()
                ot = train_steps(r, cfg.steps, timed_opt)
                sync(device)
                step_s[r["name"]].append((time.perf_counter() - t0) / cfg.steps)
                if timed_opt:
                    opt_s[r["name"]].append(ot / cfg.steps)
            if progress:
                progress.update(1)

    for trial in range(cfg.trials):
        run_trial(trial)

    rows = {}
    for name in names:
        med = statistics.median(step_s[name])
        rows[name] = {
            "label": contenders[name][0], "median_step_s": med, "min_step_s": min(step_s[name]),
            "max_step_s": max(step_s[name]), "steps_per_s": 1.0 / med,
            "opt_median_s": statistics.median(opt_s[name]) if opt_s[name] else None,
            "final_loss": losses[name], "step_s": step_s[name],
        }
    # the unclipped reference of each round: the mean of the unclipped copies
    unclipped = round_means([rows[n]["step_s"] for n in ("fused_wd-noclip", "fused_wd-noclip-twin")
                             if n in rows])
    ref = rows.get("torch-default", {}).get("median_step_s")
    for name, row in rows.items():
        if ref:
            row["speedup_vs_torch_default"] = ref / row["median_step_s"]
        if "torch-fused" in rows:
            row["speedup_vs_torch_fused"] = rows["torch-fused"]["median_step_s"] / row["median_step_s"]
        if "fused_wd-noclip" in rows:
            # paired by round: each round ran every contender back to back
            row["time_vs_unclipped"], row["time_vs_unclipped_per_trial"] = paired_medians(
                row["step_s"], unclipped, cfg.repeats)
    return {
        "model": f"GPT, d={cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads, vocab {cfg.vocab}, "
                 f"seq {cfg.seq}, batch {cfg.batch}",
        "nparams": nparams, "config": cfg.__dict__.copy(), "device": str(device),
        "fused_wd_available": import_fused_wd() is not None,
        "rows": rows, "steps_total": cfg.trials * (cfg.warmup + cfg.repeats * cfg.steps),
    }


def round_means(series):
    """Per round, the mean of several contenders' times (lists alike in length)."""
    return [sum(ts) / len(ts) for ts in zip(*series)]


def paired_medians(times, ref, rounds_per_trial):
    """The median over rounds of times / ref (paired by round), and that
    median per trial (consecutive runs of rounds_per_trial rounds)."""
    pairs = [a / b for a, b in zip(times, ref)]
    return statistics.median(pairs), [statistics.median(pairs[i:i + rounds_per_trial])
                                      for i in range(0, len(pairs), rounds_per_trial)]


def units(cfg: E2EConfig) -> int:
    return cfg.trials * (1 + cfg.repeats)
