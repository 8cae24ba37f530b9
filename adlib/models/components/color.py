"""Colour augmentations on ``[B, 3, H, W]`` images in [0, 1], drawn from an explicit generator."""
from __future__ import annotations

import torch


def luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[B, 1, H, W]`` of RGB images."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def color_jitter(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Per image one of brightness, contrast or saturation, changed by a factor drawn from
    ``[1 - strength, 1 + strength]`` (blending with black, the mean luma, or the luma image)."""
    if strength <= 0:
        return images
    out = []
    for image in images.split(1):
        kind = int(torch.randint(3, (1,), generator=generator))
        factor = 1.0 + strength * (2.0 * float(torch.rand(1, generator=generator)) - 1.0)
        anchor = 0.0 if kind == 0 else luma(image).mean() if kind == 1 else luma(image)
        out.append((anchor + factor * (image - anchor)).clamp(0.0, 1.0))
    return torch.cat(out)


def grayscale_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The images where ``flip`` (``[B]`` bool) is set replaced by their luma in all three channels."""
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), luma(images).expand_as(images), images)


def random_grayscale(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Each image replaced by its luma in all three channels with ``probability``."""
    if probability <= 0:
        return images
    return grayscale_where(images, torch.rand(len(images), generator=generator) < probability)


__all__ = ["color_jitter", "grayscale_where", "luma", "random_grayscale"]
