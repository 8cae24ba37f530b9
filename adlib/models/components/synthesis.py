"""DRAEM's anomaly synthesis: Perlin-shaped regions filled with augmented foreign textures.

Zavrtanik et al., "DRAEM - A discriminatively trained reconstruction embedding for surface
anomaly detection" (ICCV 2021), Sec. 3.3: a thresholded Perlin-noise mask ``M`` selects where a
texture image ``A`` (from DTD, augmented by 3 random colour/geometry operations) is blended into
a normal image ``I``: ``I_a = (1 - M) * I + (1 - beta) * M * I + beta * M * A``, ``beta ~ U[0, 0.8]``.
Half of the images (``p_anomalous``) stay normal with an empty mask.

Textures: a batch of decoded texture images (DTD) that the training loop streams to the model
(:class:`adlib.models.base.AuxStream`), or, without one, a built-in procedural generator
(coloured multi-octave Perlin noise, stripes, checkerboards and cells). The procedural fallback
stands in for DTD when the auxiliary data set is unavailable offline; results differ from the
paper's setting, and runs that used it say so in their provenance and leaderboard row.

Every random choice is drawn from an explicit CPU ``torch.Generator`` (so a seed gives the same
anomalies on any machine); the per-pixel work runs on the images' device.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from adlib.models.components.perlin import perlin_noise, random_perlin_mask, rotate_map

FILLS = ("texture", "colour")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1, dtype=torch.float64).uniform_(low, high, generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Integer in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=gen))


# ----- procedural textures (the documented fallback for a missing DTD folder) -----------------
def procedural_texture(size: Sequence[int], gen: torch.Generator,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """A random synthetic texture ``[3, H, W]`` in [0, 1] (the fallback for a missing DTD).

    Random parameters come from ``gen`` (CPU); the per-pixel work runs on ``device``.
    """
    h, w = int(size[0]), int(size[1])

    def colour() -> torch.Tensor:
        return torch.rand(3, 1, 1, generator=gen).to(device)

    kind = _randint(gen, 0, 4)
    if kind == 0:  # coloured fractal Perlin noise (stains, grain)
        noise = torch.zeros(h, w, device=device)
        base = 2 ** _randint(gen, 0, 4)
        amp, total = 1.0, 0.0
        for octave in range(4):
            res = base * 2**octave
            noise += amp * perlin_noise((h, w), (res, res), gen, device=device)
            total += amp
            amp *= 0.5
        t = (noise / total)[None]
        t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-6)
        return (1 - t) * colour() + t * colour()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device),
                            indexing="ij")
    angle = _uniform(gen, 0.0, math.pi)
    freq = _uniform(gen, 2.0, 24.0)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == 1:  # stripes / waves
        t = (0.5 + 0.5 * torch.sin(2 * math.pi * freq * u + _uniform(gen, 0, 2 * math.pi)))[None]
    elif kind == 2:  # checkerboard / grid
        t = (((u * freq).floor() + (v * freq).floor()) % 2)[None]
    else:  # cells: distance to random points (Worley-like)
        pts = torch.rand(_randint(gen, 4, 48), 2, generator=gen).to(device)
        d = torch.cdist(torch.stack([yy.flatten(), xx.flatten()], 1), pts).min(dim=1).values.view(h, w)
        t = (d / d.max().clamp_min(1e-6))[None]
    return ((1 - t) * colour() + t * colour()).clamp(0, 1)


# ----- texture augmentations (DRAEM's list, re-implemented on tensors) ---------------------
def _gamma(x, g):
    return x.clamp_min(0).pow(_uniform(g, 0.5, 2.0))


def _multiply_add(x, g):
    return x * _uniform(g, 0.8, 1.2) + _uniform(g, -30 / 255, 30 / 255)


def _sharpen(x, g):
    kernel = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]], device=x.device)
    kernel = kernel.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    sharp = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)[0]
    alpha = _uniform(g, 0.0, 1.0)
    return (1 - alpha) * x + alpha * sharp * _uniform(g, 0.5, 2.0)


def _hue_saturation(x, g):
    # rotate the chroma plane of YIQ (hue) and scale it (saturation)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    theta = math.radians(_uniform(g, -50.0, 50.0))
    sat = _uniform(g, 0.5, 1.5)
    cos, sin = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    rot[1:, 1:] *= sat
    mat = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(x.device)
    return torch.einsum("ij,jhw->ihw", mat, x)


def _solarize(x, g):
    threshold = _uniform(g, 32 / 255, 128 / 255)
    return torch.where(x >= threshold, 1.0 - x, x)


def _posterize(x, g):
    levels = 2 ** _randint(g, 1, 8)
    return torch.floor(x.clamp(0, 1) * (levels - 1) + 0.5) / (levels - 1)


def _invert(x, g):
    return 1.0 - x


def _autocontrast(x, g):
    lo = x.flatten(1).amin(1).view(3, 1, 1)
    hi = x.flatten(1).amax(1).view(3, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _equalize(x, g):
    q = (x.clamp(0, 1) * 255).round().long()
    out = torch.empty_like(x)
    for c in range(3):
        hist = torch.bincount(q[c].flatten(), minlength=256).float()
        cdf = hist.cumsum(0)
        cdf = (cdf - cdf[cdf > 0][0]) / (cdf[-1] - cdf[cdf > 0][0]).clamp_min(1.0)
        out[c] = cdf.clamp_min(0)[q[c]]
    return out


def _rotate(x, g):
    return rotate_map(x, _uniform(g, -45.0, 45.0))


TEXTURE_AUGMENTATIONS: tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], ...] = (
    _gamma, _multiply_add, _sharpen, _hue_saturation, _solarize, _posterize, _invert, _autocontrast, _equalize,
    _rotate)


def augment_texture(texture: torch.Tensor, gen: torch.Generator, count: int = 3) -> torch.Tensor:
    """Apply ``count`` distinct random augmentations (in random order) to ``[3, H, W]`` in [0, 1]."""
    pick = torch.randperm(len(TEXTURE_AUGMENTATIONS), generator=gen)[:count]
    for i in pick.tolist():
        texture = TEXTURE_AUGMENTATIONS[i](texture, gen).clamp(0.0, 1.0)
    return texture


# ----- synthesis ------------------------------------------------------------------------------
class AnomalySynthesizer:
    """Turns a batch of normal images into (augmented images, masks) following DRAEM.

    ``fill="colour"`` fills each region with one uniform random colour instead of an augmented
    texture (DSR's image-space anomalies, Zavrtanik et al. ECCV 2022); the source's blending
    weight ``beta`` is drawn from ``U[beta_min, beta_max]`` (DRAEM: ``[0, 0.8]``, DSR: ``[0.2, 1]``).
    """

    def __init__(self, seed: int = 0, p_anomalous: float = 0.5, beta_max: float = 0.8, beta_min: float = 0.0,
                 fill: str = "texture") -> None:
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}; got {fill!r}")
        self.p_anomalous = float(p_anomalous)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.fill = fill
        self.generator = torch.Generator().manual_seed(int(seed))

    def _source(self, textures: torch.Tensor | None, i: int, size: tuple[int, int], device) -> torch.Tensor:
        g = self.generator
        if self.fill == "colour":
            return torch.rand(3, 1, 1, generator=g).to(device).expand(3, *size)
        source = textures[i] if textures is not None else procedural_texture(size, g, device=device)
        return augment_texture(source.to(device, torch.float32), g)

    def __call__(self, images: torch.Tensor, textures: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` ``[B, 3, H, W]`` in [0, 1] -> (augmented images in [0, 1], masks ``[B, 1, H, W]``).

        ``textures`` (``[B, 3, H, W]`` in [0, 1], one per image) are the anomaly sources; without
        them procedural textures are drawn.
        """
        g, device = self.generator, images.device
        b, _, h, w = images.shape
        sources = torch.zeros(b, 3, h, w, device=device)
        masks = torch.zeros(b, 1, h, w, device=device)
        betas = torch.zeros(b, 1, 1, 1)
        with torch.no_grad():
            for i in range(b):
                if _uniform(g, 0.0, 1.0) >= self.p_anomalous:
                    continue  # this image stays normal
                masks[i, 0] = random_perlin_mask((h, w), g, device=device)
                sources[i] = self._source(textures, i, (h, w), device)
                betas[i] = _uniform(g, self.beta_min, self.beta_max)
            masks, sources = masks.to(images.dtype), sources.to(images.dtype)
            betas = betas.to(device, images.dtype)
            augmented = (1 - masks) * images + (1 - betas) * masks * images + betas * masks * sources
        return augmented, masks
