"""The two param groups every training script builds by hand: weight decay
for weight matrices and embeddings, none for biases and normalization layers."""
import torch

_NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
)


def param_groups_for_decay(model, weight_decay, no_decay_names=("bias",), extra=None):
    """Returns [{"params": decayed, "weight_decay": weight_decay},
    {"params": not_decayed, "weight_decay": 0.0}] for `model`.

    Not decayed: parameters of normalization layers (BatchNorm, LayerNorm,
    GroupNorm, RMSNorm, ...), 1-D parameters, and parameters whose name ends
    with one of `no_decay_names`. Frozen parameters (requires_grad=False) are
    left out. `extra` (a dict) is merged into both groups. Each parameter
    appears once, even when modules share it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"param_groups_for_decay needs an nn.Module, got {type(model).__name__}")
    norm_types = _NORM_TYPES + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, norm_types) or p.dim() < 2 or full.endswith(tuple(no_decay_names)):
                no_decay.append(p)
            else:
                decay.append(p)
    extra = dict(extra or {})
    return [dict(extra, params=decay, weight_decay=float(weight_decay)),
            dict(extra, params=no_decay, weight_decay=0.0)]
