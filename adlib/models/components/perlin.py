"""2D Perlin (gradient) noise and the random Perlin masks of DRAEM's anomaly synthesis.

Perlin, "An image synthesizer" (SIGGRAPH 1985) / "Improving noise" (SIGGRAPH 2002): random unit
gradients on a lattice of ``res`` cells per axis, dot products with the offsets to the four cell
corners, blended with the quintic fade ``6t^5 - 15t^4 + 10t^3``. The raw noise lies in
``[-sqrt(1/2), sqrt(1/2)]``; :func:`perlin_noise` rescales it to ``[0, 1]``.

All randomness comes from an explicit CPU ``torch.Generator``, so a seed gives the same noise on
every machine; the per-pixel arithmetic can run on any device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_RAW_MAX = math.sqrt(0.5)
#: DRAEM thresholds the raw noise at 0.5; the same level on the [0, 1] scale of perlin_noise
DRAEM_THRESHOLD = (0.5 / _RAW_MAX + 1.0) / 2.0


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(size: Sequence[int], res: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Perlin noise of ``size`` (H, W) with ``res`` (ry, rx) lattice cells per axis, in ``[0, 1]``.

    The random lattice gradients are drawn on the CPU (so a seed gives the same noise everywhere);
    the per-pixel work runs on ``device``.
    """
    h, w = int(size[0]), int(size[1])
    ry, rx = int(res[0]), int(res[1])
    if min(h, w, ry, rx) < 1:
        raise ValueError(f"perlin_noise needs positive size and res; got size={tuple(size)}, res={tuple(res)}")
    angles = torch.rand(ry + 1, rx + 1, generator=generator, dtype=torch.float64) * (2 * math.pi)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float().to(device)  # [ry+1, rx+1, 2]
    u = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * (ry / h)  # lattice coords of pixel centres
    v = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * (rx / w)
    iy = u.floor().long().clamp(max=ry - 1)
    ix = v.floor().long().clamp(max=rx - 1)
    fy = (u - iy)[:, None]  # [H, 1]
    fx = (v - ix)[None, :]  # [1, W]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[iy + dy][:, ix + dx]  # [H, W, 2]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    raw = torch.lerp(top, bottom, ty)
    return ((raw / _RAW_MAX + 1.0) / 2.0).clamp(0.0, 1.0)


def rotate_map(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``[C, H, W]`` (or ``[H, W]``) about its centre; borders are filled by reflection."""
    squeeze = image.ndim == 2
    x = image[None, None] if squeeze else image[None]
    theta = math.radians(degrees)
    h, w = x.shape[-2:]
    # affine_grid works in normalised coordinates; correct for the aspect ratio
    mat = torch.tensor([[math.cos(theta), -math.sin(theta) * h / w, 0.0],
                        [math.sin(theta) * w / h, math.cos(theta), 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(mat[None], list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out[0, 0] if squeeze else out[0]


def random_perlin_mask(size: Sequence[int], generator: torch.Generator, *, min_scale_exp: int = 0,
                       max_scale_exp: int = 6, threshold: float = DRAEM_THRESHOLD, rotate: bool = True,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """DRAEM's anomaly mask: Perlin noise with ``2^k`` cells per axis (``k`` drawn independently per
    axis from ``[min_scale_exp, max_scale_exp)``), rotated by a random angle in [-90, 90] degrees,
    thresholded. Returns a ``[H, W]`` float mask of zeros and ones on ``device``."""
    ry = 2 ** int(torch.randint(min_scale_exp, max_scale_exp, (1,), generator=generator))
    rx = 2 ** int(torch.randint(min_scale_exp, max_scale_exp, (1,), generator=generator))
    noise = perlin_noise(size, (ry, rx), generator, device=device)
    if rotate:
        noise = rotate_map(noise, float(torch.empty(1).uniform_(-90.0, 90.0, generator=generator)))
    return (noise > threshold).float()
