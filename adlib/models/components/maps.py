"""Anomaly-map post-processing: upsampling to the input size and Gaussian smoothing."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def upsample_map(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[B, h, w]`` maps to ``size`` (H, W); returns ``[B, H, W]``."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, **kwargs).squeeze(1)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, radius: int | None = None,
                      dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (SciPy's convention), or
    of the given ``radius``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = int(truncate * sigma + 0.5) if radius is None else int(radius)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur2d(maps: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps (reflect padding; replicate on maps
    smaller than the kernel radius), truncated at ``4 sigma`` or at ``radius`` pixels.
    ``sigma <= 0`` returns the maps unchanged."""
    if sigma is None or sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, radius=radius, dtype=maps.dtype, device=maps.device)
    radius = kernel.numel() // 2
    h, w = maps.shape[-2:]
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.pad(maps.unsqueeze(1), (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def max_score(maps: torch.Tensor) -> torch.Tensor:
    """Per-image maximum of ``[B, H, W]`` maps."""
    return maps.flatten(1).amax(dim=1)


__all__ = ["gaussian_blur2d", "gaussian_kernel1d", "max_score", "upsample_map"]
