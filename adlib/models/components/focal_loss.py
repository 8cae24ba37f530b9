"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) for per-pixel
segmentation logits: ``-alpha_t * (1 - p_t)^gamma * log(p_t)``, averaged over pixels."""
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
