"""Overlay pictures drawn straight into pixels with Pillow: image | ground truth | heat map over
the image | thresholded map, with titles and the heat map's colour scale.

About 10x faster than laying out a four-panel matplotlib figure (~15 ms instead of ~150 ms per
picture), which matters because every run writes several.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from adlib.io import atomic_path

_PAD, _HEADER, _LABEL, _FOOTER = 6, 18, 14, 16
_ANOMALY_RGB = np.array([214, 39, 40], dtype=np.float32)  # matplotlib's tab:red
_ALPHA_HEAT, _ALPHA_FLAG = 0.5, 0.6


def render_overlay(image: np.ndarray, mask: np.ndarray | None, heat: np.ndarray, threshold: float | None,
                   path: str | os.PathLike, title: str = "", vmin: float | None = None,
                   vmax: float | None = None) -> Path:
    """Write the four-panel PNG. ``image``: ``[H, W]`` or ``[H, W, 3]``, uint8 or floats in
    [0, 1]; ``heat``: ``[h, w]`` (stretched bilinearly over the image); ``mask``: ``[H', W']`` or
    ``None``; ``vmin``/``vmax`` fix the colour range (default: the map's own)."""
    rgb = _rgb_uint8(image)
    h, w = rgb.shape[:2]
    heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    lo = float(heat.min()) if vmin is None else float(vmin)
    hi = float(heat.max()) if vmax is None else float(vmax)
    scaled = np.clip((heat - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(heat)
    colours = colormaps["jet"](scaled)[..., :3] * 255.0
    base = rgb.astype(np.float32)
    panels = [rgb, _mask_panel(mask, h, w), _blend(base, colours, _ALPHA_HEAT)]
    if threshold is None:
        panels.append(rgb)
    else:
        flagged = heat >= threshold
        marked = base.copy()
        marked[flagged] = _blend(base[flagged], _ANOMALY_RGB, _ALPHA_FLAG)
        panels.append(marked.astype(np.uint8))
    labels = ["image", "ground truth", "heat map",
              "no threshold" if threshold is None else f"score >= {threshold:.4g}"]
    canvas = Image.new("RGB", (4 * w + 5 * _PAD, _HEADER + _LABEL + h + _FOOTER + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((_PAD, 3), title, fill="black", font=font)
    top = _HEADER + _LABEL
    for i, (panel, label) in enumerate(zip(panels, labels)):
        left = _PAD + i * (w + _PAD)
        canvas.paste(Image.fromarray(panel), (left, top))
        draw.text((left, _HEADER), label, fill="black", font=font)
    if mask is None:
        draw.text((_PAD + w + _PAD + 4, top + 4), "no ground truth", fill="white", font=font)
    _colour_scale(canvas, draw, font, _PAD + 2 * (w + _PAD), top + h + 3, w, lo, hi)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image)


def _mask_panel(mask: np.ndarray | None, h: int, w: int) -> np.ndarray:
    if mask is None:
        return np.zeros((h, w, 3), dtype=np.uint8)
    binary = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    return np.repeat(np.asarray(binary)[..., None], 3, axis=2)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    return ((1.0 - alpha) * base + alpha * colour).clip(0, 255).astype(np.uint8)


def _colour_scale(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, left: int, top: int, width: int,
                  lo: float, hi: float) -> None:
    """A jet gradient under the heat-map panel with its end values."""
    gradient = (colormaps["jet"](np.linspace(0.0, 1.0, width))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(gradient[None], 4, axis=0)), (left, top))
    draw.text((left, top + 4), f"{lo:.3g}", fill="black", font=font)
    label = f"{hi:.3g}"
    draw.text((left + width - int(draw.textlength(label, font=font)), top + 4), label, fill="black", font=font)
