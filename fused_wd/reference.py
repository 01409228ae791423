"""A readable pure-PyTorch implementation of docs/design.md, "The math": the oracle
of the tests and a baseline of the benchmarks.

`reference.Adam`, `reference.AdamW` and `reference.SGD` take exactly the
arguments of their fused namesakes and keep the same state; only the math
differs: it is written out here with one tensor operation per line, per
parameter, in float32 (float64 for float64 parameters).
"""
import torch

from fused_wd import optim


def _opmath(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Reference:
    """Replaces the kernels of a fused optimizer with the spelled-out math."""

    def _norm(self, grads, norm_type):
        # Per-tensor norms in float64, then the norm of the norms.
        device = grads[0].device
        norms = [torch.linalg.vector_norm(g.double(), norm_type) for g in grads if g.numel()]
        if not norms:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type).float()

    @staticmethod
    def _prep(kw):
        """(skip, inv_scale, clip_coef) as float32 values, read on the host."""
        skip = kw["found_inf"] is not None and kw["found_inf"].item() != 0
        inv_scale = torch.tensor(1.0)
        if kw["grad_scale"] is not None:
            inv_scale = (1.0 / kw["grad_scale"].double().reshape(())).float()
        coef = torch.tensor(1.0)
        if kw["grad_norm"] is not None:
            norm = kw["grad_norm"].float().reshape(())
            if kw["skip_nonfinite"] and not torch.isfinite(norm):
                skip = True
            coef = torch.clamp(kw["max_norm"] / (norm + 1e-6), max=1.0)
        return skip, inv_scale.float().cpu(), coef.float().cpu()

    @staticmethod
    def _lr(kw):
        return kw["lr_tensor"].item() if kw["lr_tensor"] is not None else kw["lr"]

    @staticmethod
    def _grad(g, inv_scale, coef, maximize, dt):
        g = g.to(dt) * inv_scale.to(g.device, dt)
        g = g * coef.to(g.device, dt)
        return -g if maximize else g

    @staticmethod
    def _decay(p, g, kw, lr):
        wd = kw["weight_decay"]
        if wd == 0:
            return p, g
        if kw["decay_mode"] == optim.DECAY_MODES["l2"]:
            return p, g + wd * p
        if kw["decay_mode"] == optim.DECAY_MODES["decoupled"]:
            return p * (1.0 - lr * wd), g
        return p * (1.0 - wd * lr / kw["initial_lr"]), g


class _ReferenceAdam(_Reference):
    def _update(self, group, lists, kw, gi):
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, masters = (
            lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.max_exp_avg_sqs,
            lists.state_steps, lists.master_params)
        if group["stochastic_rounding"]:
            raise NotImplementedError("fused_wd.reference does not do stochastic rounding")
        skip, inv_scale, coef = self._prep(kw)
        if skip:
            return
        lr = self._lr(kw)
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        for i, (p_, g_, m_, v_, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
            dt = _opmath(p_)
            # with a master copy the update runs on it; p_ is its rounding
            src = p_ if masters[i] is None else masters[i]
            p, m, v = src.to(dt), m_.to(dt), v_.to(dt)
            g = self._grad(g_, inv_scale, coef, kw["maximize"], dt)
            p, g = self._decay(p, g, kw, lr)
            step += 1
            t = step.item()
            m = torch.lerp(m, g, 1.0 - beta1)
            v = v * beta2 + (1.0 - beta2) * g * g
            if group["amsgrad"]:
                vmax = torch.maximum(max_sqs[i].to(dt), v)
                max_sqs[i].copy_(vmax)
                v_hat = vmax
            else:
                v_hat = v
            bias_correction1 = 1.0 - beta1 ** t
            bias_correction2 = 1.0 - beta2 ** t
            denom = v_hat.sqrt() / (bias_correction2 ** 0.5) + eps
            p = p - (lr / bias_correction1) * (m / denom)
            if masters[i] is not None:
                masters[i].copy_(p)
            p_.copy_(p)
            m_.copy_(m)
            v_.copy_(v)


class _ReferenceSGD(_Reference):
    def _update(self, group, lists, kw, gi):
        params, grads, bufs, is_new, masters = (lists.params, lists.grads, lists.momentum_buffers,
                                                lists.buffer_is_new, lists.master_params)
        if group["stochastic_rounding"]:
            raise NotImplementedError("fused_wd.reference does not do stochastic rounding")
        skip, inv_scale, coef = self._prep(kw)
        if skip:
            return
        lr = self._lr(kw)
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        for i, (p_, g_) in enumerate(zip(params, grads)):
            dt = _opmath(p_)
            p = (p_ if masters[i] is None else masters[i]).to(dt)
            g = self._grad(g_, inv_scale, coef, kw["maximize"], dt)
            p, g = self._decay(p, g, kw, lr)
            if momentum != 0:
                if is_new[i]:
                    buf = g.clone()
                else:
                    buf = bufs[i].to(dt) * momentum + (1.0 - dampening) * g
                bufs[i].copy_(buf)
                g = g + momentum * buf if group["nesterov"] else buf
            p = p - lr * g
            if masters[i] is not None:
                masters[i].copy_(p)
            p_.copy_(p)


class Adam(_ReferenceAdam, optim.Adam):
    """Reference Adam (same arguments as fused_wd.Adam)."""


class AdamW(_ReferenceAdam, optim.AdamW):
    """Reference AdamW (same arguments as fused_wd.AdamW)."""


class SGD(_ReferenceSGD, optim.SGD):
    """Reference SGD (same arguments as fused_wd.SGD)."""
