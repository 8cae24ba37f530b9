"""Structural similarity (Wang et al., "Image quality assessment: from error visibility to
structural similarity", IEEE TIP 2004) with an 11x11 Gaussian window (sigma 1.5), and the
``1 - SSIM`` loss used by reconstruction models (e.g. DRAEM, Bergmann et al.'s SSIM autoencoder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adlib.models.components.maps import gaussian_kernel1d

_SIGMA = 1.5
_RADIUS = 5  # 11x11 window


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM of ``[B, C, H, W]`` images (mean over channels): ``[B, H, W]``.

    ``data_range`` is the value range of the images (1 for [0, 1] images); borders are handled by
    reflection padding so the map keeps the input size.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim_map needs two [B, C, H, W] tensors of the same shape; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = x.float(), y.float()
    c = x.shape[1]
    k = gaussian_kernel1d(_SIGMA, truncate=_RADIUS / _SIGMA, device=x.device)
    kh = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kv = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    radius = k.numel() // 2
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (radius, radius, radius, radius), mode=mode)
        return F.conv2d(F.conv2d(t, kh, groups=c), kv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim.mean(dim=1)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``1 - mean SSIM`` (0 for identical images)."""
    return 1.0 - ssim_map(x, y, data_range).mean()
