"""fused_wd.bench: the benchmark suite behind ``python -m fused_wd.bench``.

Times the whole optimizer step (gradient clipping included) of fused_wd
against torch.optim (for-loop, foreach, fused, each with
``torch.nn.utils.clip_grad_norm_``), ``fused_wd.reference`` and peers
(DeepSpeed, apex) when importable, side by side in one process, against the
machine's own measured memory bandwidth. See benchmarks/README.md.
"""


def main(argv=None) -> int:
    from fused_wd.bench.cli import main as _main
    return _main(argv)


__all__ = ["main"]
