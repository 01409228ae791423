"""The benchmark's CPU peers, DeepSpeed's CPU Adam and torchao's AdamW: when
installed they run in the benchmark's process and end at the oracle's
parameters (fp32 and bf16, with and without clip_grad_norm_). Skipped when
they are not installed (pip install .[peers]); DeepSpeed builds its CPU op
on first use, which takes minutes once."""
import importlib.util

import pytest
import torch

from fused_wd.bench.impls import IMPLS, Hyper
from fused_wd.bench.presets import get_shapes
from fused_wd.bench.runner import Case, RunOpts, run_case


def installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("name,module", [("deepspeed", "deepspeed"), ("torchao", "torchao")])
def test_cpu_peer_matches_the_oracle(name, module, clip, dtype):
    if not installed(module):
        pytest.skip(f"{module} is not installed")
    impl = IMPLS[name]
    assert impl.check("cpu", "adamw", dtype) is None
    assert impl.prepare(torch.device("cpu"), "adamw", dtype) is None  # builds / compiles it
    case = Case("tiny", get_shapes("tiny"), "adamw", clip, dtype, torch.device("cpu"))
    opts = RunOpts(repeats=2, warmup=1, fixed_iters=2)
    res = run_case(case, [name, "fused_wd"], Hyper(), opts, None, None)
    row = res["impls"][name]
    assert row["status"] == "ok", row
    assert row["check"]["ok"], row["check"]
    assert row["check"]["rel_err"] < (1e-4 if dtype == torch.float32 else 0.1), row["check"]
    assert res["impls"]["fused_wd"]["check"]["ok"]


def test_peer_notices_without_the_package(monkeypatch):
    from fused_wd.bench import impls
    monkeypatch.setattr(impls, "_have", lambda module: False)
    assert "pip install deepspeed" in IMPLS["deepspeed"].check("cpu", "adamw", torch.float32)
    assert "pip install torchao" in IMPLS["torchao"].check("cpu", "adamw", torch.float32)
    assert IMPLS["torchao"].check("cpu", "sgd", torch.float32)  # AdamW only
    assert IMPLS["deepspeed"].check("cpu", "sgd", torch.float32)
