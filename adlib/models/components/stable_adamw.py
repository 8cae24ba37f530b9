"""StableAdamW: AdamW with per-tensor update clipping.

Wortsman et al., "Stable and low-precision training for large-scale vision-language models",
NeurIPS 2023 (arXiv:2304.13013), Sec. 3.4; the optimiser Dinomaly trains with.

Each parameter tensor is updated as in AdamW (decoupled weight decay, bias-corrected moments,
optional AMSGrad), except that its step size is divided by ``max(1, RMS / clip_threshold)``,
where ``RMS`` is the root mean square of ``g / (sqrt(v_hat) + eps)`` over the tensor: the ratio
of the current gradient to the second-moment estimate. When a gradient is much larger than the
running estimate (the estimate is stale, e.g. after a quiet phase) the update is shrunk instead
of spiking. With an infinite ``clip_threshold`` this is exactly ``torch.optim.AdamW``.

(torch-optimi and pytorch-optimizer on PyPI also offer a StableAdamW; neither is a dependency.)
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class StableAdamW(torch.optim.Optimizer):
    """AdamW whose per-tensor step is scaled by ``1 / max(1, RMS(g / denom) / clip_threshold)``."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 clip_threshold: float = 1.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"StableAdamW needs non-negative lr, eps and weight_decay; got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"StableAdamW betas must lie in [0, 1); got {tuple(betas)}")
        if clip_threshold <= 0:
            raise ValueError(f"StableAdamW clip_threshold must be positive; got {clip_threshold}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, clip_threshold=clip_threshold))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                self._update(param, group, beta1, beta2)
        return loss

    def _update(self, param: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        grad = param.grad
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        param.mul_(1.0 - group["lr"] * group["weight_decay"])  # decoupled weight decay
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        second = exp_avg_sq
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        denom = (second.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(group["eps"])

        # a tensor, not a float: no device synchronisation per parameter
        shrink = ((grad / denom).square().mean().sqrt() / group["clip_threshold"]).clamp_(min=1.0)
        param.addcdiv_(exp_avg, denom * shrink, value=-group["lr"] / (1.0 - beta1 ** step))
