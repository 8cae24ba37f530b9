"""Turning multi-layer backbone feature maps into per-position embeddings; multi-scale inputs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def finest_grid(maps: Sequence[torch.Tensor]) -> tuple[int, int]:
    """The largest spatial size ``(H, W)`` among ``[B, C, h, w]`` maps (the shallowest layer's)."""
    if not maps:
        raise ValueError("need at least one feature map")
    return max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])


def concat_feature_maps(maps: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Resize every map to the largest spatial size among them and concatenate channels.

    ``maps``: ``[B, C_i, h_i, w_i]`` tensors. Returns ``[B, sum C_i, H, W]`` (channels in the
    given order). ``mode`` is the interpolation used for the smaller (deeper) maps.
    """
    size = finest_grid(maps)
    resized = [m if tuple(m.shape[-2:]) == size else _resize(m, size, mode) for m in maps]
    return torch.cat(resized, dim=1)


def position_major_embedding(maps: Sequence[torch.Tensor], channels: torch.Tensor | None = None) -> torch.Tensor:
    """``[H * W, B, D]``: the nearest-upsampled concatenation of ``maps`` (optionally only the
    sorted global ``channels``), positions first.

    Equals ``concat_feature_maps(maps, "nearest", channels).flatten(2).permute(2, 0, 1)`` but
    writes every layer once, straight into the per-position layout that per-position statistics
    need (a full-resolution transpose of the embedding is several times slower).
    """
    height, width = finest_grid(maps)
    if channels is not None:
        maps = _select_channels(maps, channels)
    batch, dim = maps[0].shape[0], sum(m.shape[1] for m in maps)
    out = torch.empty(height, width, batch, dim, dtype=maps[0].dtype, device=maps[0].device)
    start = 0
    for m in maps:
        c, (h, w) = m.shape[1], m.shape[-2:]
        target = out[:, :, :, start:start + c]
        if height % h == 0 and width % w == 0:  # whole factors: nearest = repeat rows and columns
            fh, fw = height // h, width // w
            source = m.permute(2, 3, 0, 1)[:, None, :, None].expand(h, fh, w, fw, batch, c)
            target.view(h, fh, w, fw, batch, c).copy_(source)
        else:
            target.copy_(_resize(m, (height, width), "nearest").permute(2, 3, 0, 1))
        start += c
    return out.view(height * width, batch, dim)


def _select_channels(maps: Sequence[torch.Tensor], channels: torch.Tensor) -> list[torch.Tensor]:
    """Per-map slices of sorted global channel indices ``channels``."""
    chosen, offset = [], 0
    for m in maps:
        inside = (channels >= offset) & (channels < offset + m.shape[1])
        chosen.append(m.index_select(1, channels[inside] - offset))
        offset += m.shape[1]
    return chosen


def _resize(fmap: torch.Tensor, size: torch.Size, mode: str) -> torch.Tensor:
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(fmap, size=size, mode=mode, align_corners=False)
    return F.interpolate(fmap, size=size, mode=mode)


def local_patch_average(fmap: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """Average every position with its ``patch_size x patch_size`` neighbourhood (PatchCore's
    locally aware patch features); zero padding keeps the spatial size."""
    if patch_size <= 1:
        return fmap
    return F.avg_pool2d(fmap, kernel_size=patch_size, stride=1, padding=patch_size // 2)


def reduce_channels(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the channel axis of ``[B, C, h, w]`` down to ``dim`` channels."""
    b, c, h, w = embedding.shape
    if dim >= c:
        return embedding
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, c)
    pooled = F.adaptive_avg_pool1d(flat, dim)
    return pooled.reshape(b, h, w, dim).permute(0, 3, 1, 2)


def to_patch_rows(embedding: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B * h * w, C]`` (image-major, then row-major positions)."""
    b, c, h, w = embedding.shape
    return embedding.permute(0, 2, 3, 1).reshape(b * h * w, c)


def image_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``images`` ``[B, 3, H, W]`` and ``levels - 1`` copies at 1/2, 1/4, ... of each side
    (antialiased bilinear resizing), finest first: the multi-scale inputs of CS-Flow and U-Flow."""
    h, w = images.shape[-2:]
    return [images] + [F.interpolate(images, size=(h >> k, w >> k), mode="bilinear", align_corners=False,
                                     antialias=True) for k in range(1, levels)]
