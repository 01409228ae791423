"""The CPU kernels' tuning (docs/design.md, "CPU tuning"): chosen per CPU,
shown by `python -m fused_wd info` and the benchmark, forced with
FUSED_WD_CPU_PREFETCH or set_cpu_tuning, and never changing a bit."""
import os
import subprocess
import sys

import pytest
import torch

import fused_wd
from fused_wd import _cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    e = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


@pytest.fixture
def restore_tuning():
    before = fused_wd.cpu_tuning()
    yield
    fused_wd.set_cpu_tuning(before["prefetch_blocks"], before["locality"])


def test_default_is_a_rule_for_this_cpu_and_info_shows_it():
    r = _python("import fused_wd; print(fused_wd.cpu_tuning())", FUSED_WD_CPU_PREFETCH="")
    assert r.returncode == 0, r.stderr
    assert "rule for" in r.stdout and "CPUs" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fused_wd", "info"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "CPU tuning: prefetch" in r.stdout
    assert "CPU: " in r.stdout


ZEN5_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_bf16

processor\t: 1
vendor_id\t: GenuineIntel
"""


def test_cpu_identity_names_family_model_and_core():
    info = _cpu.parse_cpuinfo(ZEN5_CPUINFO)
    assert (info["vendor"], info["family"], info["model"], info["stepping"]) == ("AuthenticAMD", 26, 2, 1)
    assert info["core"] == "Zen 5"
    assert info["isa_flags"] == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                 "avx512_bf16"]
    info["caches"] = {"L2": "1024K", "L3": "32768K"}
    assert _cpu.describe(info) == "AMD EPYC (family 26 model 2 stepping 1, Zen 5; L2 1024K, L3 32768K)"


@pytest.mark.parametrize("vendor,family,model,core", [
    ("AuthenticAMD", 25, 1, "Zen 3"), ("AuthenticAMD", 25, 0x11, "Zen 4"), ("AuthenticAMD", 25, 0xA0, "Zen 4"),
    ("AuthenticAMD", 23, 0x31, "Zen 2"), ("AuthenticAMD", 26, 0x11, "Zen 5"), ("GenuineIntel", 6, 143, None),
    ("AuthenticAMD", 21, 2, None)])
def test_core_generation(vendor, family, model, core):
    assert _cpu.core_name(vendor, family, model) == core


def test_cpu_identity_of_this_machine_is_recorded_by_the_benchmark():
    from fused_wd.bench.report import environment
    env = environment(torch.device("cpu"), [])
    assert env["cpu"] == _cpu.identity()
    assert env["device_name"] == _cpu.describe(env["cpu"])


@pytest.mark.parametrize("value,want", [("off", (0, 3)), ("0", (0, 3)), ("16", (16, 3)), ("4:1", (4, 1))])
def test_environment_forces_the_tuning(value, want):
    r = _python("import fused_wd; t = fused_wd.cpu_tuning(); print(t['prefetch_blocks'], t['locality'], t['reason'])",
                FUSED_WD_CPU_PREFETCH=value)
    assert r.returncode == 0, r.stderr
    blocks, locality, reason = r.stdout.split(" ", 2)
    assert (int(blocks), int(locality)) == want
    assert "forced" in reason


@pytest.mark.parametrize("value", ["fast", "8:", "8:4", "-1", "2000", "8:1:2"])
def test_a_bad_environment_value_is_an_error_naming_it(value):
    r = _python("import fused_wd; fused_wd.cpu_tuning()", FUSED_WD_CPU_PREFETCH=value)
    assert r.returncode != 0
    assert "FUSED_WD_CPU_PREFETCH must be" in r.stderr and value in r.stderr


def test_set_cpu_tuning_refuses_out_of_range(restore_tuning):
    with pytest.raises(ValueError, match="locality in"):
        fused_wd.set_cpu_tuning(8, 4)
    with pytest.raises(ValueError, match="prefetch_blocks must be"):
        fused_wd.set_cpu_tuning(-1, 3)
    fused_wd.set_cpu_tuning(2, 0)
    t = fused_wd.cpu_tuning()
    assert (t["prefetch_blocks"], t["locality"]) == (2, 0) and "set_cpu_tuning" in t["reason"]


CASES = {
    "AdamW-clip-fp32": (torch.float32, dict(name="AdamW", max_grad_norm=0.5)),
    "AdamW-bf16-master": (torch.bfloat16, dict(name="AdamW", master_weights=True, max_grad_norm=0.5)),
    "AdamW-bf16-stochastic": (torch.bfloat16, dict(name="AdamW", stochastic_rounding=True)),
    "SGD-momentum-clip": (torch.float32, dict(name="SGD", momentum=0.9, max_grad_norm=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_tuning_changes_a_bit(case, restore_tuning):
    """The same steps under every kind of tuning: params, every state tensor
    and the statistics of the pass are the same bits."""
    dtype, kw = CASES[case]
    kw = dict(kw)
    name = kw.pop("name")

    def run(blocks, locality):
        fused_wd.set_cpu_tuning(blocks, locality)
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(700, 300), (1000,), (3, 5)]]
        opt = getattr(fused_wd, name)(ps, lr=0.01, weight_decay=0.1, **kw)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
            if step == 0:
                assert opt.last_weight_norm is not None   # the later steps write the statistics
        state = [v.clone() for p in ps for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
        return [p.detach().clone() for p in ps], state, [b.clone() for b in opt._norm_slots._stats.values()]

    want = run(8, 3)
    for blocks, locality in [(0, 3), (1, 0), (32, 2), (200, 1)]:
        got = run(blocks, locality)
        for a, b in zip(want, got):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), (blocks, locality)
