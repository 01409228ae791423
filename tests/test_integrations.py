"""The README's "Use it with…" recipes, run as they stand, on tiny models on
the CPU: HF Trainer, Lightning, Accelerate and a plain loop with GradScaler.

Each recipe (fused_wd.AdamW(max_grad_norm=1.0), the framework's clipping off)
must end at the parameters of the same framework clipping on its own with
torch.optim.AdamW (within fp32 rounding), the loss must fall, and the run
without any clipping must end elsewhere (so the clip really happened, once).
Leaving the framework's clipping on as well must give the same parameters
and the double-clip warning.

A framework that is not installed skips its tests; CI sets
FUSED_WD_REQUIRE_INTEGRATIONS=1 (and installs the extra `integrations`), so
there a missing framework fails instead.
"""
import gc
import importlib
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_wd
from fused_wd import _clip_guard

README = Path(__file__).resolve().parents[1] / "README.md"
REQUIRE = os.environ.get("FUSED_WD_REQUIRE_INTEGRATIONS") == "1"
MAX_STEPS = 8
MAX_NORM = 1.0  # the README's; the tiny model's grad norms are 20-100x larger
TWICE = "clipped twice"


def need(module):
    if REQUIRE:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def snippet(name):
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no python block after <!-- snippet: {name} -->"
    return m.group(1)


class TinyRegressor(nn.Module):
    """Returns {"loss", "logits"} from keyword inputs, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        loss = None if labels is None else F.mse_loss(out.float(), labels)
        return {"loss": loss, "logits": out}


def make_model():
    torch.manual_seed(0)
    return TinyRegressor()


def make_dataset(n=128):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = 20.0 * torch.sin(x @ w) + 10.0
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def make_loader(ds):
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


def full_loss(model, ds):
    x = torch.stack([e["x"] for e in ds])
    y = torch.stack([e["labels"] for e in ds])
    with torch.no_grad():
        return float(model(x=x, labels=y)["loss"])


def flat(model):
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


def rel_err(a, b, start):
    """max |a - b| over the largest move the reference b made from start."""
    return float((a - b).abs().max() / (b - start).abs().max())


@pytest.fixture(autouse=True)
def fresh_guard():
    _clip_guard.reset()
    yield
    _clip_guard.reset()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the frameworks write logs and checkpoints to ./


def twice_warnings(record):
    return [w for w in record if TWICE in str(w.message)]


def run_recording(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, twice_warnings(rec)


def check_recipe(runs, start, loss0):
    """runs: name -> (final flat params, final full-data loss, double-clip warnings)."""
    recipe, ref, double, unclipped = (runs[k] for k in ("recipe", "reference", "double", "unclipped"))
    assert recipe[1] < loss0, f"the loss did not fall: {loss0} -> {recipe[1]}"
    assert rel_err(recipe[0], ref[0], start) < 3e-4, "the recipe differs from the framework's own clipping"
    assert rel_err(double[0], ref[0], start) < 3e-4, "clipping twice changed the result"
    assert rel_err(unclipped[0], ref[0], start) > 2e-2, "clipping had no effect: the test cannot tell"
    assert not recipe[2] and not ref[2] and not unclipped[2], "warned without a double clip"
    assert len(double[2]) == 1, "the double clip was not warned about exactly once"


def grad_norm_at_start(ds):
    model = make_model()
    batch = next(iter(make_loader(ds)))
    model(**batch)["loss"].backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def test_tiny_problem_clips():
    assert grad_norm_at_start(make_dataset()) > 10 * MAX_NORM


# ------------------------------------------------------------ HF Trainer ----

def hf_run(kind):
    transformers = need("transformers")
    ds = make_dataset()
    model = make_model()
    if kind == "recipe":
        ns = dict(model=model, train_ds=ds, max_steps=MAX_STEPS)
        exec(snippet("hf-trainer"), ns)
        return ns["trainer"].model, ds
    # the same Trainer, optimizer and schedule, with the clipping done differently
    opt_cls = torch.optim.AdamW if kind in ("reference", "unclipped") else fused_wd.AdamW
    extra = dict(max_grad_norm=MAX_NORM) if kind == "double" else {}
    groups = fused_wd.param_groups_for_decay(model, 0.1)
    opt = opt_cls(groups, lr=3e-4, **extra)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=MAX_STEPS)
    clip = {"reference": MAX_NORM, "double": MAX_NORM, "unclipped": 0}[kind]
    args = transformers.TrainingArguments("out", max_steps=MAX_STEPS, max_grad_norm=clip, report_to="none")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))
    trainer.train()
    return trainer.model, ds


def test_hf_trainer_recipe():
    ds = make_dataset()
    start, loss0 = flat(make_model()), full_loss(make_model(), ds)
    runs = {}
    for kind in ("recipe", "reference", "double", "unclipped"):
        (model, ds), warned = run_recording(hf_run, kind)
        runs[kind] = (flat(model), full_loss(model, ds), warned)
    check_recipe(runs, start, loss0)


def test_hf_trainer_optimizer_cls_and_kwargs(monkeypatch):
    """The Trainer builds fused_wd.AdamW itself; with max_grad_norm=0 it
    clips nothing (it only measures the norm, with max_norm=inf)."""
    transformers = need("transformers")
    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *a, **kw):
        calls.append(float(max_norm))
        return original(parameters, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    results = {}
    for name, cls, kwargs, clip in (
            ("fused", fused_wd.AdamW, dict(lr=3e-4, max_grad_norm=MAX_NORM), 0),
            ("torch", torch.optim.AdamW, dict(lr=3e-4), MAX_NORM)):
        ds, model = make_dataset(), make_model()
        args = transformers.TrainingArguments("out", max_steps=MAX_STEPS, max_grad_norm=clip,
                                              learning_rate=3e-4, report_to="none")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                       optimizer_cls_and_kwargs=(cls, kwargs))
        calls.clear()
        trainer.train()
        opt = trainer.optimizer
        while not isinstance(opt, (fused_wd.AdamW, torch.optim.AdamW)):
            opt = opt.optimizer  # accelerate's wrapper
        assert isinstance(opt, cls)
        results[name] = (flat(trainer.model), list(calls), opt)
    # the README says so: with max_grad_norm=0 (transformers 5.x) every step still
    # measures the norm through clip_grad_norm_(params, inf), and nothing clips
    fused_calls = results["fused"][1]
    assert all(math.isinf(c) for c in fused_calls), fused_calls
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert len(fused_calls) == MAX_STEPS, fused_calls
    assert results["torch"][1] and all(c == MAX_NORM for c in results["torch"][1])
    fused_opt = results["fused"][2]
    assert fused_opt.last_grad_norm is not None and float(fused_opt.last_grad_norm) > MAX_NORM
    start = flat(make_model())
    assert rel_err(results["fused"][0], results["torch"][0], start) < 1e-3


def lit_module(L, model, fused):
    """A LightningModule training `model` with fused_wd.AdamW (clipping
    fused) or torch's AdamW."""

    class Lit(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch)["loss"]

        def configure_optimizers(self):
            if fused:
                return fused_wd.AdamW(self.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=MAX_NORM)
            return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.1)

    return Lit(model)


# ------------------------------------------------------------- Lightning ----

def lightning_run(kind, precision="32-true"):
    L = need("lightning")
    ds = make_dataset()
    model = make_model()
    if kind == "recipe" and precision == "32-true":
        ns = dict(model=model, train_loader=make_loader(ds), max_steps=MAX_STEPS)
        exec(snippet("lightning"), ns)
        return model, ds
    fused = kind in ("recipe", "double")

    clip = MAX_NORM if kind in ("reference", "double") else None
    trainer = L.Trainer(max_steps=MAX_STEPS, gradient_clip_val=clip, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(lit_module(L, model, fused), make_loader(ds))
    return model, ds


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_recipe(precision):
    ds = make_dataset()
    start, loss0 = flat(make_model()), full_loss(make_model(), ds)
    runs = {}
    for kind in ("recipe", "reference", "double", "unclipped"):
        if kind == "double" and precision != "32-true":
            # Lightning's AMP plugin refuses gradient_clip_val for an optimizer
            # that unscales in its step: no silent double clip there
            with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
                lightning_run(kind, precision)
            runs[kind] = runs["recipe"][:2] + ([object()],)
            continue
        (model, ds), warned = run_recording(lightning_run, kind, precision)
        runs[kind] = (flat(model), full_loss(model, ds), warned)
    check_recipe(runs, start, loss0)


def test_lightning_16_mixed_refuses_gradient_clip_val():
    """The same for fp16 AMP (a GPU setting: on the CPU Lightning turns
    16-mixed into bf16-mixed), on the plugin itself."""
    need("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    model = make_model()
    opt = fused_wd.AdamW(model.parameters(), lr=3e-4, max_grad_norm=MAX_NORM)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        plugin.clip_gradients(opt, clip_val=MAX_NORM)
    plugin.clip_gradients(opt, clip_val=0.0)  # unset: nothing to refuse
    torch_opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plugin.clip_gradients(torch_opt, clip_val=MAX_NORM)  # torch's for-loop AdamW: Lightning clips


def test_lightning_16_mixed_hands_the_scaler_to_fused_wd():
    """fp16 AMP with a GradScaler, the plugin given explicitly (Lightning's
    precision="16-mixed" flag picks bf16 on the CPU): Lightning leaves the
    unscaling to fused_wd's step, which matches torch.optim.AdamW with
    Lightning's unscale + gradient_clip_val, skipped overflow steps included."""
    L = need("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision
    out = {}
    for fused in (True, False):
        ds, model = make_dataset(), make_model()

        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        trainer = L.Trainer(max_steps=MAX_STEPS, plugins=[plugin], gradient_clip_val=None if fused else MAX_NORM,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(lit_module(L, model, fused), make_loader(ds))
        assert trainer.precision_plugin is plugin
        out[fused] = (flat(model), plugin.scaler.get_scale())
    assert out[True][1] == out[False][1] < 65536.0  # the same overflow steps were skipped
    assert rel_err(out[True][0], out[False][0], flat(make_model())) < 3e-4


# ------------------------------------------------------------ Accelerate ----

def accelerate_run(kind):
    accelerate = need("accelerate")
    accelerate.state.AcceleratorState._reset_state(True)
    ds = make_dataset()
    model = make_model()
    if kind == "recipe":
        ns = dict(model=model, train_loader=make_loader(ds), max_steps=MAX_STEPS)
        exec(snippet("accelerate"), ns)
        return ns["accelerator"].unwrap_model(ns["model"]), ds
    accelerator = accelerate.Accelerator()
    if kind == "double":
        opt = fused_wd.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=MAX_NORM)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    model, opt, loader = accelerator.prepare(model, opt, make_loader(ds))
    for step, batch in zip(range(MAX_STEPS), loader):
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        if kind != "unclipped":
            accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
    return accelerator.unwrap_model(model), ds


def test_accelerate_recipe():
    ds = make_dataset()
    start, loss0 = flat(make_model()), full_loss(make_model(), ds)
    runs = {}
    for kind in ("recipe", "reference", "double", "unclipped"):
        (model, ds), warned = run_recording(accelerate_run, kind)
        runs[kind] = (flat(model), full_loss(model, ds), warned)
    check_recipe(runs, start, loss0)


# ------------------------------------------------ plain loop, GradScaler ----

def scaler_run(kind):
    ds = make_dataset()
    model = make_model()
    loader = make_loader(ds)
    if kind == "recipe":
        ns = dict(model=model, train_loader=loader, max_steps=MAX_STEPS)
        exec(snippet("grad-scaler"), ns)
        return model, ds, ns["scaler"], ns["opt"]
    fused = kind == "double"
    if fused:
        opt = fused_wd.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=MAX_NORM)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for step, batch in zip(range(MAX_STEPS), loader):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch)["loss"]
        scaler.scale(loss).backward()
        if kind != "unclipped":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return model, ds, scaler, opt


def test_grad_scaler_recipe():
    ds = make_dataset()
    start, loss0 = flat(make_model()), full_loss(make_model(), ds)
    runs, scalers = {}, {}
    for kind in ("recipe", "reference", "double", "unclipped"):
        (model, ds, scaler, opt), warned = run_recording(scaler_run, kind)
        runs[kind] = (flat(model), full_loss(model, ds), warned)
        scalers[kind] = (scaler.get_scale(), int(opt.state[next(model.parameters())]["step"]))
    check_recipe(runs, start, loss0)
    # the default scale (65536) overflows the fp16 activations' grads at first:
    # those steps are skipped, identically in every run, and some steps ran
    scale, steps = scalers["recipe"]
    assert scale < 65536.0 and 0 < steps < MAX_STEPS, scalers
    assert scalers["recipe"] == scalers["reference"] == scalers["double"], scalers


# ---------------------------------------------------------------- guard ----

def guard_setup(max_grad_norm=MAX_NORM):
    model = make_model()
    opt = fused_wd.AdamW(model.parameters(), lr=1e-3, max_grad_norm=max_grad_norm)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    return model, opt


def test_guard_warns_once_on_a_double_clip():
    model, opt = guard_setup()
    with pytest.warns(UserWarning, match=TWICE) as rec:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    assert "fused_wd.AdamW" in str(rec[0].message) and "max_grad_norm=1.0" in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller
    _, again = run_recording(torch.nn.utils.clip_grad_norm_, model.parameters(), 2.0)
    assert not again
    # the wrapped function still clips
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert abs(float(norm) - 2.0) < 1e-4


def test_guard_quiet_without_a_double_clip():
    model, opt = guard_setup(max_grad_norm=None)
    other = make_model()
    _, fused = guard_setup()
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    for params, max_norm in ((model.parameters(), 1.0),  # its optimizer does not clip
                             (other.parameters(), 1.0),  # no optimizer clips these
                             (fused.param_groups[0]["params"], math.inf)):  # measures, does not clip
        _, warned = run_recording(torch.nn.utils.clip_grad_norm_, params, max_norm)
        assert not warned, (params, max_norm)


def test_guard_sees_fused_wd_clip_and_a_single_tensor():
    model, opt = guard_setup()
    with pytest.warns(UserWarning, match=TWICE):
        fused_wd.clip_grad_norm_(model.parameters(), 1.0)
    _clip_guard.reset()
    model, opt = guard_setup()
    with pytest.warns(UserWarning, match=TWICE):
        torch.nn.utils.clip_grad_norm_(next(model.parameters()), 1.0)


def test_guard_follows_the_groups_and_dies_with_the_optimizer():
    model, opt = guard_setup()
    opt.param_groups[0]["max_grad_norm"] = None  # clipping switched off later
    _, warned = run_recording(torch.nn.utils.clip_grad_norm_, model.parameters(), 1.0)
    assert not warned
    model, opt = guard_setup()
    del opt
    gc.collect()
    _, warned = run_recording(torch.nn.utils.clip_grad_norm_, model.parameters(), 1.0)
    assert not warned


def test_guard_reinstalls_after_a_replacement(monkeypatch):
    """Something (a test's spy, another library) replaced torch's function
    after the wrapper was installed: the next clipping optimizer wraps again."""
    guard_setup()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", torch.nn.utils.clip_grad_norm_.__wrapped__)
    model, opt = guard_setup()
    with pytest.warns(UserWarning, match=TWICE):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_guard_off_by_env(monkeypatch):
    monkeypatch.setenv("FUSED_WD_CLIP_GUARD", "0")
    model, opt = guard_setup()
    _, warned = run_recording(torch.nn.utils.clip_grad_norm_, model.parameters(), 1.0)
    assert not warned
