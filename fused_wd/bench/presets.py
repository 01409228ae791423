"""Model-shaped parameter sets.

A preset is a list of tensor shapes taken from a real architecture (the
shapes an optimizer sees: embeddings, attention and MLP matrices, biases,
norm weights). ``scale_shapes`` resizes a preset to about N parameters while
keeping the number of tensors and the proportions of every shape: each
dimension is multiplied by the same factor.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

Shape = tuple


def _gpt(vocab: int, ctx: int, d: int, layers: int, mlp: int = 4) -> list[Shape]:
    """GPT-2 style: tied wte, wpe, pre-LN blocks with biases, final LN (148 tensors at 12 layers)."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),                    # ln_1 weight, bias
            (3 * d, d), (3 * d,),          # attn.c_attn
            (d, d), (d,),                  # attn.c_proj
            (d,), (d,),                    # ln_2
            (mlp * d, d), (mlp * d,),      # mlp.c_fc
            (d, mlp * d), (d,),            # mlp.c_proj
        ]
    shapes += [(d,), (d,)]                 # ln_f
    return shapes


def _llama(vocab: int, d: int, layers: int, ffn: int, kv: int) -> list[Shape]:
    """Llama style: untied embedding and lm_head, GQA (kv = n_kv_heads * head_dim), SwiGLU, RMSNorm."""
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [
            (d,),                          # input_layernorm
            (d, d), (kv, d), (kv, d), (d, d),  # q, k, v, o
            (d,),                          # post_attention_layernorm
            (ffn, d), (ffn, d), (d, ffn),  # gate, up, down
        ]
    shapes += [(d,), (vocab, d)]           # final norm, lm_head
    return shapes


def _many_small(count: int = 4000) -> list[Shape]:
    """Thousands of tiny tensors (per-channel scales, small convs, heads): a deterministic mix."""
    pattern = [(64,), (128,), (16, 16), (32, 8), (256,), (8, 3, 3), (48,), (24, 24), (96,), (12, 12, 3)]
    return [pattern[i % len(pattern)] for i in range(count)]


@dataclass
class Preset:
    name: str
    description: str
    shapes: list
    # (optim, clip) pairs run when the user does not pass --optim/--clip.
    default_runs: list = field(default_factory=lambda: [("adamw", True), ("sgd", True)])
    # a study with its own measurement instead of the bandwidth tables
    # ("overhead": fused_wd/bench/overhead.py)
    study: str | None = None

    @property
    def numel(self) -> int:
        return numel(self.shapes)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", "GPT-style, d=32, 2 layers (about 35k params; for tests)", _gpt(256, 64, 32, 2)),
        Preset("gpt2-124m", "GPT-2 small shapes: d=768, 12 layers, vocab 50257, ctx 1024",
               _gpt(50257, 1024, 768, 12)),
        Preset("llama-1b", "Llama-style 1.1B (TinyLlama shapes): d=2048, 22 layers, ffn 5632, GQA kv=256, vocab 32000",
               _llama(32000, 2048, 22, 5632, 256)),
        Preset("many-small", "4000 tiny tensors (8 to 576 elements each)", _many_small()),
        Preset("cpu-50m", "issue-2 speed study: 50M fp32 params in 160 GPT-shaped tensors "
               "(d=472, 13 layers, vocab 32000, ctx 1024)",
               _gpt(32000, 1024, 472, 13),
               default_runs=[("adamw", True), ("adamw", False), ("sgd", True)]),
        Preset("overhead", "issue-21 host cost per tensor: 100, 1000, 10000 tensors of 16 fp32 "
               "elements (--sizes for other counts), fresh and kept grads, fused_wd vs torch fused",
               [(16,)] * 1000, study="overhead"),
    ]
}


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _scaled(shapes, f: float, multiple: int):
    out = []
    for s in shapes:
        dims = []
        for d in s:
            x = d * f
            if d >= 4 * multiple and x >= multiple:
                x = max(multiple, multiple * round(x / multiple))
            dims.append(max(1, int(round(x))))
        out.append(tuple(dims))
    return out


def scale_shapes(shapes, target: int, multiple: int = 8):
    """Multiply every dimension by one factor so the total is about ``target``.

    Dimensions that were multiples of 8 stay multiples of ``multiple`` where
    they are large enough, so kernels see realistic alignment.
    """
    base = numel(shapes)
    if target <= 0:
        raise ValueError("target parameter count must be positive")
    if abs(base - target) / target < 1e-3:
        return list(shapes)
    lo, hi = 1e-6, 1e6
    for _ in range(100):  # bisection on the factor (total is monotone in it)
        mid = math.sqrt(lo * hi)
        if numel(_scaled(shapes, mid, 1)) < target:
            lo = mid
        else:
            hi = mid
    f = math.sqrt(lo * hi)
    best = _scaled(shapes, f, multiple)
    # rounding to multiples can move the total: keep whichever of the two is closer
    plain = _scaled(shapes, f, 1)
    if abs(numel(plain) - target) < 0.9 * abs(numel(best) - target) and abs(numel(best) - target) / target > 0.05:
        best = plain
    return best


_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """'50M', '1.5B', '124000000', '2e6' -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbBtT]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (examples: 50M, 1.5B, 2000000)")
    n = int(round(float(m.group(1)) * _SUFFIX[m.group(2).upper()]))
    if n <= 0:
        raise ValueError(f"parameter count must be positive: {text!r}")
    return n


def fmt_count(n: float) -> str:
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.3g}{suf}" if v < 100 else f"{v:.0f}{suf}"
    return str(int(n))


def get_shapes(preset: str, target: int | None = None):
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    shapes = PRESETS[preset].shapes
    return scale_shapes(shapes, target) if target else list(shapes)
