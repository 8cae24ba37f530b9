"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
``-alpha_t * (1 - p_t)^gamma * log(p_t)``, averaged, for softmax logits over K classes per pixel
(:func:`focal_loss`) or for sigmoid logits of a binary target (:func:`binary_focal_loss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None) -> torch.Tensor:
    """``logits`` ``[B, K, H, W]``, ``target`` ``[B, H, W]`` class indices (or ``[B, 1, H, W]``).

    ``alpha`` (binary case) weights class 1 by ``alpha`` and class 0 by ``1 - alpha``; None: no weighting.
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    target = target.long()
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, target[:, None])[:, 0]
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * torch.where(target == 1, alpha, 1.0 - alpha)
    return loss.mean()


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of sigmoid ``logits`` against ``target`` in {0, 1} (same shape), averaged:
    ``-(1 - p_t)^gamma * log(p_t)`` with ``p_t = sigmoid(logit)`` for positives, ``1 - sigmoid`` else."""
    logits, target = logits.float(), target.float()
    log_pt = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (-((1.0 - log_pt.exp()) ** gamma) * log_pt).mean()
