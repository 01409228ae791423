"""The implementations the benchmark compares, each behind one interface.

``Impl.make(params, optim, clip, hp)`` returns ``(optimizer, step)`` where
``step()`` is the whole optimizer step a training loop would run: the
gradient clipping (when on) followed by ``optimizer.step()``. Everything a
baseline needs outside the optimizer (``torch.nn.utils.clip_grad_norm_``) is
inside ``step`` so the times compare like for like.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Hyper:
    lr_adam: float = 1e-3
    lr_sgd: float = 1e-2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    momentum: float = 0.9
    max_norm: float = 1.0

    def lr(self, optim: str) -> float:
        return self.lr_sgd if optim == "sgd" else self.lr_adam


OPTIMS = ("adam", "adamw", "sgd")


@dataclass
class Impl:
    name: str
    label: str
    kind: str  # "fused_wd" | "torch" | "reference" | "peer"
    # (device_type, optim, dtype) -> None if usable, else a one-line reason
    check: Callable[[str, str, torch.dtype], Optional[str]]
    make: Callable
    # arithmetic done in the storage dtype for bf16/fp16 params (torch's for-loop and foreach)
    half_math: bool = False

    def prepare(self, device: torch.device, optim: str, dtype: torch.dtype) -> str | None:
        """Build/load whatever the implementation compiles on first use (DeepSpeed's JIT ops) on a
        tiny tensor, before anything is timed. Returns an error line or None."""
        if self.check(device.type, optim, dtype):
            return None
        try:
            p = torch.nn.Parameter(torch.zeros(64, device=device, dtype=dtype))
            p.grad = torch.zeros_like(p)
            _, step = self.make([p], optim, True, Hyper())
            step()
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return None


def _clip_then(params, hp, clip, opt):
    if not clip:
        return opt.step

    clip_ = torch.nn.utils.clip_grad_norm_
    max_norm = hp.max_norm

    def step():
        clip_(params, max_norm)
        opt.step()

    return step


def _torch_opt(params, optim, hp, **kw):
    if optim == "sgd":
        return torch.optim.SGD(params, lr=hp.lr(optim), momentum=hp.momentum,
                               weight_decay=hp.weight_decay, **kw)
    cls = torch.optim.AdamW if optim == "adamw" else torch.optim.Adam
    return cls(params, lr=hp.lr(optim), betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay, **kw)


# ---------------------------------------------------------------- fused_wd ----

_FW_ERR: list = []


def import_fused_wd():
    """The fused_wd package, or None (the reason goes to ``fused_wd_error()``)."""
    try:
        mod = importlib.import_module("fused_wd")
        for name in ("Adam", "AdamW", "SGD"):
            getattr(mod, name)
        return mod
    except Exception as e:  # noqa: BLE001 - any import failure degrades to "unavailable"
        if not _FW_ERR:
            _FW_ERR.append(f"{type(e).__name__}: {e}".splitlines()[0][:200])
        return None


def fused_wd_error() -> str:
    return _FW_ERR[0] if _FW_ERR else ""


def import_reference():
    try:
        ref = importlib.import_module("fused_wd.reference")
        for name in ("Adam", "AdamW", "SGD"):
            getattr(ref, name)
        return ref
    except Exception as e:  # noqa: BLE001
        _REF_ERR[:] = [f"{type(e).__name__}: {e}".splitlines()[0][:200]]
        return None


_REF_ERR: list = []


def _fw_kwargs(optim, hp, clip):
    kw = dict(lr=hp.lr(optim), weight_decay=hp.weight_decay, max_grad_norm=hp.max_norm if clip else None)
    if optim == "sgd":
        kw["momentum"] = hp.momentum
    else:
        kw.update(betas=hp.betas, eps=hp.eps)
    return kw


_CLS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def _make_fused_wd(params, optim, clip, hp):
    mod = import_fused_wd()
    opt = getattr(mod, _CLS[optim])(params, **_fw_kwargs(optim, hp, clip))
    return opt, opt.step


def _check_fused_wd(dev, optim, dtype):
    mod = import_fused_wd()
    if mod is None:
        return f"fused_wd not importable ({fused_wd_error()}); build it: pip install --no-build-isolation -e ."
    backends = getattr(mod, "backends", None)
    try:
        have = backends() if callable(backends) else None
    except Exception:  # noqa: BLE001
        have = None
    if have is not None and dev not in have:
        return (f"fused_wd was built without {dev} kernels (backends: {', '.join(have) or 'none'}); "
                "rebuild: pip install --no-build-isolation -e .")
    return None


def _make_reference(params, optim, clip, hp):
    ref = import_reference()
    opt = getattr(ref, _CLS[optim])(params, **_fw_kwargs(optim, hp, clip))
    return opt, opt.step


def _check_reference(dev, optim, dtype):
    if import_reference() is None:
        return f"fused_wd.reference not importable ({_REF_ERR[0] if _REF_ERR else '?'})"
    return None


# ------------------------------------------------------------------- torch ----

def _make_torch(variant):
    kw = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[variant]

    def make(params, optim, clip, hp):
        opt = _torch_opt(params, optim, hp, **kw)
        return opt, _clip_then(params, hp, clip, opt)

    return make


def _check_torch(variant):
    def check(dev, optim, dtype):
        if variant == "fused":
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
            if dev not in _get_fused_kernels_supported_devices():
                return f"torch {torch.__version__} has no fused {optim} on {dev}"
        return None

    return check


def torch_default_variant(device_type: str) -> str:
    """What ``torch.optim.AdamW(params)`` picks when foreach/fused are left at None."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
    return "foreach" if device_type in _get_foreach_kernels_supported_devices() else "forloop"


# ------------------------------------------------------------------- peers ----

def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_deepspeed(dev, optim, dtype):
    if optim == "sgd":
        return "DeepSpeed has no SGD"
    if not _have("deepspeed"):
        return "not installed: pip install deepspeed  (or pip install .[peers])"
    if dev not in ("cpu", "cuda"):
        return f"no DeepSpeed Adam for {dev}"
    return None


def _make_deepspeed(params, optim, clip, hp):
    dev = params[0].device.type
    if dev == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam as cls
    else:
        from deepspeed.ops.adam import FusedAdam as cls
    kw = dict(lr=hp.lr(optim), betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)
    if dev == "cpu":
        # states in the param's dtype, as torch.optim and fused_wd keep them
        # (DeepSpeed's default makes fp32 moments for bf16 params)
        low = params[0].dtype in (torch.bfloat16, torch.float16)
        opt = cls(params, adamw_mode=(optim == "adamw"), fp32_optimizer_states=not low, **kw)
    else:
        opt = cls(params, adam_w_mode=(optim == "adamw"), **kw)
    return opt, _clip_then(params, hp, clip, opt)


def _torchao_adamw():
    """torchao's full-precision AdamW: `AdamW` where torchao.optim exports one,
    else `_AdamW` (0.18 exports only `_AdamW` beside the 8/4-bit and fp8 ones)."""
    optim = importlib.import_module("torchao.optim")
    cls = getattr(optim, "AdamW", None) or getattr(optim, "_AdamW", None)
    if cls is None:
        raise ImportError("torchao.optim has neither AdamW nor _AdamW")
    return cls


def _check_torchao(dev, optim, dtype):
    if optim != "adamw":
        return "torchao.optim has a full-precision AdamW only"
    if not _have("torchao"):
        return "not installed: pip install torchao  (or pip install .[peers])"
    try:
        _torchao_adamw()
    except Exception as e:  # noqa: BLE001
        return f"torchao.optim unusable ({type(e).__name__}: {e})"[:200]
    if dtype not in (torch.float32, torch.bfloat16):
        return f"not measured for {dtype}"
    return None


def _make_torchao(params, optim, clip, hp):
    # one torch.compile'd step per parameter (compiled once per shape, in the warm-up)
    opt = _torchao_adamw()(params, lr=hp.lr(optim), betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)
    return opt, _clip_then(params, hp, clip, opt)


def _check_apex(dev, optim, dtype):
    if dev != "cuda":
        return "apex FusedAdam/FusedSGD are GPU only"
    if not _have("apex"):
        return ("not installed: pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
                "--config-settings '--build-option=--cuda_ext' git+https://github.com/NVIDIA/apex")
    try:
        importlib.import_module("apex.optimizers")
    except Exception as e:  # noqa: BLE001
        return f"apex installed without its CUDA extensions ({type(e).__name__})"
    return None


def _make_apex(params, optim, clip, hp):
    from apex.optimizers import FusedAdam, FusedSGD
    if optim == "sgd":
        opt = FusedSGD(params, lr=hp.lr(optim), momentum=hp.momentum, weight_decay=hp.weight_decay)
    else:
        opt = FusedAdam(params, lr=hp.lr(optim), betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                        adam_w_mode=(optim == "adamw"))
    return opt, _clip_then(params, hp, clip, opt)


IMPLS: dict[str, Impl] = {
    i.name: i
    for i in [
        Impl("fused_wd", "fused_wd", "fused_wd", _check_fused_wd, _make_fused_wd),
        Impl("torch-fused", "torch fused", "torch", _check_torch("fused"), _make_torch("fused")),
        Impl("torch-foreach", "torch foreach", "torch", _check_torch("foreach"), _make_torch("foreach"),
             half_math=True),
        Impl("torch-forloop", "torch for-loop", "torch", _check_torch("forloop"), _make_torch("forloop"),
             half_math=True),
        Impl("reference", "fused_wd.reference", "reference", _check_reference, _make_reference),
        Impl("deepspeed", "DeepSpeed Adam", "peer", _check_deepspeed, _make_deepspeed),
        Impl("torchao", "torchao AdamW", "peer", _check_torchao, _make_torchao),
        Impl("apex", "apex Fused*", "peer", _check_apex, _make_apex),
    ]
}

BASELINES = ("torch-fused", "torch-foreach", "torch-forloop")
ORACLE_ORDER = ("reference", "torch-forloop")


def resolve(spec: str | None) -> list[str]:
    """'all' / None / 'fused_wd,torch-fused' -> ids, validated, in canonical order."""
    if not spec or spec.strip() == "all":
        return list(IMPLS)
    aliases = {"torch": ["torch-fused", "torch-foreach", "torch-forloop"], "peers": ["deepspeed", "torchao", "apex"],
               "ref": ["reference"], "fused": ["fused_wd"]}
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        names = aliases.get(part, [part])
        for n in names:
            if n not in IMPLS:
                raise ValueError(f"unknown implementation {n!r}; choose from {', '.join(IMPLS)}, "
                                 f"or the groups {', '.join(aliases)}, or all")
            if n not in out:
                out.append(n)
    return [n for n in IMPLS if n in out]
