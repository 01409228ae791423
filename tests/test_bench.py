"""The benchmark suite: CLI end to end on a tiny preset, report format, presets,
the floor, the correctness flag and the memory probe. Fast on a 2-core CPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fused_wd.bench import cli, report
from fused_wd.bench.bandwidth import StreamProbe, floor_bytes_per_param
from fused_wd.bench.impls import IMPLS, Hyper, Impl, resolve
from fused_wd.bench.presets import PRESETS, get_shapes, numel, parse_count, scale_shapes
from fused_wd.bench.progress import Progress
from fused_wd.bench.runner import DTYPES, Case, RunOpts, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--repeats", "2", "--warmup", "1", "--iters", "2", "--bw-mib", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["--preset", "tiny", "--optim", "adamw,sgd", "--clip", "on", "--e2e", "tiny",
                   "--out", str(out)] + FAST)
    assert rc == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    return out, res


def test_cli_writes_all_outputs(tiny_run):
    out, res = tiny_run
    assert (out / "report.md").stat().st_size > 0
    assert (out / "results.json").stat().st_size > 0
    from fused_wd.bench.plot import have_matplotlib
    if not have_matplotlib():
        assert any("matplotlib" in n for n in res["notices"])
    else:
        png = (out / "bandwidth.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert res["plot"] == "bandwidth.png"


def test_json_content(tiny_run):
    _, res = tiny_run
    env = res["env"]
    for key in ("device", "device_name", "cpu_model", "torch", "git_commit", "date", "command", "fused_wd"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert res["bandwidth"]["median_gbps"] > 0
    assert [(c["optim"], c["clip"]) for c in res["cases"]] == [("adamw", True), ("sgd", True)]
    for case in res["cases"]:
        assert case["nparams"] == numel(PRESETS["tiny"].shapes)
        assert case["bytes_per_param"] == {"adamw": 32, "sgd": 24}[case["optim"]]
        assert case["bw_probe_gbps"] > 0 and case["iters"] == 2
        impls = case["impls"]
        assert set(impls) == set(IMPLS)
        timed = {n: r for n, r in impls.items() if "median_s" in r}
        assert {"torch-fused", "torch-foreach", "torch-forloop"} <= set(timed)
        for n, r in timed.items():
            assert len(r["times_s"]) == 2
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert r["gbps"] == pytest.approx(case["bytes_per_param"] * case["nparams"] / r["median_s"] / 1e9)
            assert r["check"]["ok"], (n, r["check"])
            # every implementation ran the same number of steps as the oracle
            assert r["steps"] == 1 + 1 + 2 * 2
        assert impls["torch-fused"]["speedup"]["torch-foreach"] == pytest.approx(
            impls["torch-foreach"]["median_s"] / impls["torch-fused"]["median_s"])
        if IMPLS["fused_wd"].check("cpu", case["optim"], torch.float32) is None:
            assert "median_s" in impls["fused_wd"]
            assert case["oracle"] == "reference"
    e2e = res["e2e"]
    assert {"torch-default", "torch-fused"} <= set(e2e["rows"])
    for r in e2e["rows"].values():
        assert r["steps_per_s"] > 0 and math.isfinite(r["final_loss"])


def test_markdown_report(tiny_run):
    out, res = tiny_run
    md = (out / "report.md").read_text()
    assert md.startswith("# fused_wd benchmark")
    assert "Command: `python -m fused_wd.bench --preset tiny" in md
    assert "| implementation" in md and "median ms" in md and "% BW" in md and "x torch-fused" in md
    assert "## End to end" in md and "steps/s" in md
    assert "![achieved bandwidth" in md or "matplotlib" in md
    assert "MISMATCH" not in md.split("## How to read this")[0]
    # every markdown table row has the header's column count
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block


def _fake_result(ok=True):
    case = {
        "title": "adamw + clip, fp32, tiny shapes, 100 params in 2 tensors", "preset": "tiny", "nparams": 100,
        "ntensors": 2, "optim": "adamw", "clip": True, "dtype": "fp32", "device": "cpu", "bytes_per_param": 32,
        "mode": "interleaved", "repeats": 3, "warmup": 1, "iters": 5, "oracle": "reference",
        "bw_probe_gbps": 10.0, "floor_s": 3.2e-7, "baselines": ["torch-fused"], "max_grad_norm": 1.0,
        "others_cpu": 0.5,
        "impls": {
            "fused_wd": {"status": "ok", "times_s": [1e-3, 2e-3, 3e-3], "median_s": 2e-3, "min_s": 1e-3,
                         "max_s": 3e-3, "gbps": 1.6e-3, "pct_bw": 0.016, "speedup": {"torch-fused": 2.0},
                         "extra_peak_bytes": 0, "launches": None,
                         "check": {"rel_err": 1e-7 if ok else 0.5, "ok": ok, "oracle": "reference"}},
            "torch-fused": {"status": "ok", "times_s": [4e-3] * 3, "median_s": 4e-3, "min_s": 4e-3, "max_s": 4e-3,
                            "gbps": 8e-4, "pct_bw": 0.008, "speedup": {"fused_wd": 0.5},
                            "extra_peak_bytes": 2**20, "check": {"rel_err": float("inf"), "ok": False}},
            "deepspeed": {"status": "unavailable", "note": "not installed: pip install deepspeed"},
        },
    }
    env = {"device": "cpu", "device_name": "Test CPU", "torch_threads": 2, "torch": "2.x", "torch_cuda": None,
           "fused_wd": "0.1.0", "git_commit": "abc", "git_dirty": False, "fused_wd_backends": ["cpu"],
           "date": "2026-01-01T00:00:00", "command": "python -m fused_wd.bench", "torch_default_optim": "forloop"}
    return {"env": env, "cases": [case], "notices": ["apex: GPU only"],
            "bandwidth": {"median_gbps": 10.0, "method": "test"}, "load": {"others_cpu": 0.5}}


def test_report_format_flags_mismatch_and_disturbance():
    md = report.render_text(_fake_result(ok=False), markdown=True)
    body = md.split("## adamw + clip")[1]
    row = next(ln for ln in body.splitlines() if ln.startswith("| fused_wd "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == ["2.00", "1.00-3.00", "0.0", "0%"]
    assert cells[5] == "2.00"  # x torch-fused
    assert cells[6] == "0.0"   # extra MB
    assert "MISMATCH" in cells[-1]
    assert "MISMATCH" in next(ln for ln in md.splitlines() if ln.startswith("| torch fused"))
    assert "deepspeed: not installed: pip install deepspeed" in md
    assert "timings disturbed" in md
    text = report.render_text(_fake_result(ok=False), markdown=False)
    assert "MISMATCH: fused_wd disagrees" in text
    md_ok = report.render_text(_fake_result(ok=True), markdown=True)
    assert "ok 1e-07" in md_ok
    js = json.loads(report.to_json(_fake_result()))  # inf is not valid JSON: encoded as a string
    assert js["cases"][0]["impls"]["torch-fused"]["check"]["rel_err"] == "inf"
    assert js["schema"] == report.SCHEMA


def test_mismatch_is_flagged(monkeypatch):
    """A deliberately wrong implementation (double learning rate) must fail the check."""
    def make_wrong(params, optim, clip, hp):
        opt = torch.optim.AdamW(params, lr=2 * hp.lr(optim), betas=hp.betas, eps=hp.eps,
                                weight_decay=hp.weight_decay, foreach=False)
        def step():
            torch.nn.utils.clip_grad_norm_(params, hp.max_norm)
            opt.step()
        return opt, step
    monkeypatch.setitem(IMPLS, "wrong", Impl("wrong", "wrong lr", "torch", lambda *a: None, make_wrong))
    case = Case("tiny", get_shapes("tiny"), "adamw", True, torch.float32, torch.device("cpu"))
    r = run_case(case, ["torch-fused", "wrong"], Hyper(), RunOpts(repeats=2, warmup=1, fixed_iters=2), None)
    assert r["impls"]["torch-fused"]["check"]["ok"]
    assert not r["impls"]["wrong"]["check"]["ok"]
    assert r["impls"]["wrong"]["check"]["rel_err"] > 0.1
    assert r["mode"] == "interleaved" and r["oracle"] in ("reference", "torch-forloop")


def test_sequential_mode_when_memory_is_short(monkeypatch):
    from fused_wd.bench import memory
    case = Case("tiny", get_shapes("tiny"), "sgd", True, torch.float32, torch.device("cpu"))
    nbytes = case.nparams * 4
    # room for one implementation at a time, not for all of them together
    monkeypatch.setattr(memory, "device_free_bytes", lambda dev: int(12 * nbytes / 0.6))
    r = run_case(case, ["torch-fused", "torch-foreach"], Hyper(), RunOpts(repeats=2, warmup=1, fixed_iters=1), None)
    assert r["mode"] == "sequential"
    for n in ("torch-fused", "torch-foreach"):
        assert r["impls"][n]["check"]["ok"] and r["impls"][n]["steps"] == 1 + 1 + 2
    monkeypatch.setattr(memory, "device_free_bytes", lambda dev: nbytes)
    r = run_case(case, ["torch-fused"], Hyper(), RunOpts(repeats=1, warmup=1), None)
    assert "needs about" in r["skipped"]


def test_presets_and_scaling():
    assert len(PRESETS["gpt2-124m"].shapes) == 148
    assert 123e6 < PRESETS["gpt2-124m"].numel < 125e6
    assert 1.0e9 < PRESETS["llama-1b"].numel < 1.2e9
    assert len(PRESETS["many-small"].shapes) >= 1000
    assert len(PRESETS["cpu-50m"].shapes) == 160 and 49e6 < PRESETS["cpu-50m"].numel < 52e6
    for preset in ("gpt2-124m", "llama-1b", "many-small"):
        for target in (10**6, 3 * 10**7):
            s = scale_shapes(PRESETS[preset].shapes, target)
            assert len(s) == len(PRESETS[preset].shapes)
            assert abs(numel(s) - target) / target < 0.05, (preset, target, numel(s))
    s = get_shapes("gpt2-124m", 10**7)
    assert s[0][0] / s[0][1] == pytest.approx(50257 / 768, rel=0.05)  # proportions kept
    assert parse_count("50M") == 50_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("2e6") == 2_000_000 and parse_count("124000000") == 124_000_000
    with pytest.raises(ValueError):
        parse_count("fifty")


def test_several_presets_each_with_its_size():
    parse = cli.build_parser().parse_args
    args = parse(["--preset", "llama-1b:2M,many-small", "--dtype", "fp32,bf16", "--optim", "adamw"])
    assert args.preset == [("llama-1b", 2_000_000), ("many-small", None)]
    planned = cli.plan(args, torch.device("cpu"))
    assert [(p, s) for p, s, _ in planned] == [("llama-1b", 2_000_000), ("many-small", None)]
    assert planned[0][2] == [("adamw", True, "fp32"), ("adamw", True, "bf16")]
    # --params sizes the presets without their own count; no --preset: the default one
    planned = cli.plan(parse(["--preset", "llama-1b:2M,tiny", "--params", "1M"]), torch.device("cpu"))
    assert [(p, s) for p, s, _ in planned] == [("llama-1b", 2_000_000), ("tiny", 1_000_000)]
    assert [p for p, _, _ in cli.plan(parse([]), torch.device("cpu"))] == [cli.DEFAULT_PRESET] * 3
    for bad in ("nope", "tiny:abc", "tiny:0"):
        with pytest.raises(SystemExit):
            parse(["--preset", bad])


def test_floor_bytes():
    assert floor_bytes_per_param("adamw", False, 4) == 28
    assert floor_bytes_per_param("adamw", True, 4) == 32
    assert floor_bytes_per_param("adam", True, 4) == 32
    assert floor_bytes_per_param("sgd", False, 4) == 20
    assert floor_bytes_per_param("sgd", True, 4) == 24
    assert floor_bytes_per_param("adamw", True, 2) == 16
    assert floor_bytes_per_param("sgd", True, 2) == 12


def test_impl_selection():
    assert resolve("all") == list(IMPLS)
    assert resolve("torch-fused,fused_wd") == ["fused_wd", "torch-fused"]
    assert resolve("torch") == ["torch-fused", "torch-foreach", "torch-forloop"]
    with pytest.raises(ValueError):
        resolve("nope")
    assert "GPU only" in IMPLS["apex"].check("cpu", "adamw", torch.float32)
    assert IMPLS["deepspeed"].check("cpu", "sgd", torch.float32)  # no SGD in DeepSpeed


def test_bandwidth_probe():
    p = StreamProbe(torch.device("cpu"), 16 << 20)
    m = p.measure(reps=3)
    assert m["median_gbps"] > 0 and len(m["samples"]) == 3
    assert "mul_" in m["method"]


def test_memory_probe_sees_a_temporary():
    from fused_wd.bench import memory
    if not memory.cpu_supported():
        pytest.skip("no /proc/self/clear_refs")
    keep = []
    extra = memory.extra_peak_bytes(lambda: keep.append(torch.ones(8 << 20)), torch.device("cpu"))  # 32 MiB
    assert extra >= 28 << 20
    extra = memory.extra_peak_bytes(lambda: None, torch.device("cpu"))
    assert extra < 8 << 20


def test_progress_text_fallback():
    import io
    buf = io.StringIO()
    p = Progress(4, stream=buf)
    p._tqdm = None
    p.set("x")
    p.update(2)
    p.write("hello")
    p.close()
    assert "hello" in buf.getvalue()


def test_wait_quiet_returns():
    from fused_wd.bench import sysload
    assert sysload.wait_quiet(0.0, window_s=0.1) in (True, False, None)


def test_module_entry_point_help_and_list():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "fused_wd.bench", "--help"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--preset" in r.stdout and "--sweep" in r.stdout
    assert cli.main(["--list"]) == 0
    assert cli.main(["--impl", "nope"]) == 2


def test_bf16_case_runs():
    case = Case("tiny", get_shapes("tiny"), "adamw", True, DTYPES["bf16"], torch.device("cpu"))
    r = run_case(case, ["torch-fused", "torch-forloop"], Hyper(), RunOpts(repeats=1, warmup=1, fixed_iters=2), None)
    assert r["bytes_per_param"] == 16
    for n in ("torch-fused", "torch-forloop"):
        assert r["impls"][n]["check"]["ok"], r["impls"][n]["check"]


def test_overhead_preset_reports_us_per_tensor(tmp_path):
    """--preset overhead: host cost per tensor of opt.step(), fused_wd next
    to torch fused, for fresh and kept grads; a study of its own."""
    rc = cli.main(["--preset", "overhead", "--sizes", "20,40", "--optim", "adamw", "--clip", "both",
                   "--repeats", "2", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert res["study"] == "overhead" and res["impls"] == ["fused_wd", "torch-fused"]
    cells = {(c["count"], c["run"], c["regime"]) for c in res["cells"]}
    assert cells == {(n, run, regime) for n in (20, 40) for run in ("AdamW", "AdamW + clip")
                     for regime in ("fresh", "kept")}
    for c in res["cells"]:
        assert all(v > 0 and math.isfinite(v) for v in c["us_per_tensor"].values())
    text = (tmp_path / "report.md").read_text()
    assert "| 40 | AdamW + clip | kept |" in text and "torch fused / fused_wd" in text
    assert cli.main(["--preset", "overhead,tiny"]) == 2


@pytest.mark.cuda_emulated
def test_cuda_host_cost_times_the_cuda_host_code_without_running_kernels():
    """benchmarks/cuda_host_cost.py: the host build of the CUDA ops, with
    launches counted but not run, timed next to the CPU op; a row per tensor
    count and step, every time positive."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda_host_cost.py"),
                          "--counts", "64", "--rounds", "1", "--evict-mib", "1"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 64 |")]
    assert [r[1].strip() for r in rows] == ["AdamW", "SGD momentum"]
    assert all(float(c) > 0 for r in rows for c in r[2:])


def test_norm_backward_bench_with_a_twin(tmp_path):
    """The norm-in-backward benchmark on a scaled-down set: every contender
    steps, the twin (a second unclipped copy) sits next to the base, and
    the norm in backward took its parts from the hooks."""
    from fused_wd.bench import norm_backward
    norm_backward.main(["--device", "cpu", "--preset", "cpu-50m", "--params", "2M", "--dtype", "fp32",
                        "--repeats", "2", "--warmup", "1", "--trials", "3", "--twin", "--malloc", "default",
                        "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["tables"]["fp32"]
    assert [r["name"] for r in rows][:2] == ["fused_wd, no clip", "fused_wd, no clip (a second copy: the noise floor)"]
    # the reference of a round is the mean of the two unclipped copies: their
    # ratios to it add up to 2 in every round, so their medians do too
    assert rows[0]["step_vs_unclipped"] + rows[1]["step_vs_unclipped"] == pytest.approx(2.0)
    assert all(a + b == pytest.approx(2.0) for a, b in zip(rows[0]["step_vs_unclipped_per_trial"],
                                                            rows[1]["step_vs_unclipped_per_trial"]))
    assert all(len(r["step_vs_unclipped_per_trial"]) == 3 for r in rows)
    nib = next(r for r in rows if "norm_in_backward" in r["name"])
    # each trial's fresh copy stepped warmup + repeats times, every hooked part from backward
    n_hooked = nib["norm_stats"]["from_backward"] // (3 * 3)
    assert n_hooked > 0 and nib["norm_stats"]["from_backward"] == 3 * 3 * n_hooked
    assert nib["norm_stats"]["at_step"] == 0
    text = (tmp_path / "report.md").read_text()
    assert "noise floor" in text and "3 trials (fresh copies) of 2 interleaved rounds" in text
    assert "malloc: as the process had it" in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_norm_backward_bench_keeps_freed_memory_under_glibc():
    """By default the benchmark makes glibc's malloc keep freed memory (in a
    process of its own here: the setting is for the whole process): once
    warm, large blocks freed and allocated again touch no new pages (left alone,
    glibc gives 16 MB blocks back and faults them in again: 40K faults)."""
    code = ("import resource, torch; from fused_wd.bench.norm_backward import keep_freed_memory\n"
            "assert keep_freed_memory()\n"
            "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(2):\n"
            "    xs = [torch.ones(1 << 22) for _ in range(10)]; del xs\n"
            "f = faults(); xs = [torch.ones(1 << 22) for _ in range(10)]\n"
            "print(faults() - f)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) < 1000  # of 40960 pages


def test_e2e_trials_make_fresh_copies_and_pool_the_rounds():
    """run_e2e with trials: every trial's rounds are kept (trials x repeats
    per contender), each contender starts each trial from the same initial
    model (so every trial ends on the same loss), and the ratio to the
    unclipped loop is given per trial too."""
    import dataclasses
    from fused_wd.bench import e2e
    cfg = dataclasses.replace(e2e.PRESETS["tiny"], trials=3, repeats=2)
    res = e2e.run_e2e(torch.device("cpu"), cfg)
    one = e2e.run_e2e(torch.device("cpu"), dataclasses.replace(cfg, trials=1))
    assert e2e.units(cfg) == 3 * (1 + 2)
    assert res["steps_total"] == 3 * (cfg.warmup + 2 * cfg.steps)
    for name, r in res["rows"].items():
        assert len(r["step_s"]) == 3 * 2
        assert r["final_loss"] == one["rows"][name]["final_loss"]
    assert res["rows"]["fused_wd-noclip"]["time_vs_unclipped_per_trial"] == [1.0] * 3
    assert len(res["rows"]["fused_wd-nib"]["time_vs_unclipped_per_trial"]) == 3
    assert "fused_wd-noclip-twin" not in res["rows"]


def test_e2e_twin_is_a_second_reference():
    """With twin, a second unclipped loop runs and the reference of each
    round is the two copies' mean: their ratios to it add up to 2."""
    import dataclasses
    from fused_wd.bench import e2e
    res = e2e.run_e2e(torch.device("cpu"), dataclasses.replace(e2e.PRESETS["tiny"], twin=True, repeats=3))
    a, b = (res["rows"][n] for n in ("fused_wd-noclip", "fused_wd-noclip-twin"))
    assert a["time_vs_unclipped"] + b["time_vs_unclipped"] == pytest.approx(2.0)
    assert a["final_loss"] == b["final_loss"]


def test_norm_backward_bench_hook_size(tmp_path, monkeypatch):
    """--hook-min sets which params get a norm hook: 1 hooks every param."""
    from fused_wd import _norm_slots
    from fused_wd.bench import norm_backward
    monkeypatch.setattr(_norm_slots, "_HOOK_READ_MIN", _norm_slots._HOOK_READ_MIN)
    norm_backward.main(["--device", "cpu", "--preset", "cpu-50m", "--params", "2M", "--dtype", "fp32",
                        "--repeats", "2", "--warmup", "1", "--hook-min", "1", "--malloc", "default",
                        "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["tables"]["fp32"]
    nib = next(r for r in rows if "norm_in_backward" in r["name"])
    assert nib["norm_stats"]["small"] == 0 and nib["norm_stats"]["from_backward"] > 0
    assert "norm hooks on params with >= 1 elements" in (tmp_path / "report.md").read_text()
