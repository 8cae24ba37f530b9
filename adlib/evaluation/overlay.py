"""Overlay pictures drawn straight into pixels with Pillow: image | ground truth | heat map over
the image | pixels above a threshold, with a title line, a caption line, panel labels and the
heat map's colour scale.

Panels are drawn at least ``MIN_PANEL`` pixels wide (small images are enlarged) so a person can
read them. About 10x faster than a four-panel matplotlib figure, which matters because every
run writes a dozen.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from adlib.io import atomic_path

#: smallest panel side in pixels
MIN_PANEL = 256
_PAD, _FONT = 8, 14
_LINE = _FONT + 6
_ANOMALY_RGB = np.array([214, 39, 40], dtype=np.float32)  # matplotlib's tab:red
_ALPHA_HEAT, _ALPHA_FLAG = 0.5, 0.6


def render_overlay(image: np.ndarray, mask: np.ndarray | None, heat: np.ndarray, threshold: float | None,
                   path: str | os.PathLike, title: str = "", vmin: float | None = None,
                   vmax: float | None = None, caption: str = "", threshold_label: str | None = None) -> Path:
    """Write the four-panel PNG. ``image``: ``[H, W]`` or ``[H, W, 3]``, uint8 or floats in
    [0, 1]; ``heat``: ``[h, w]`` (stretched bilinearly over the image); ``mask``: ``[H', W']`` or
    ``None``; ``vmin``/``vmax`` fix the colour range (default: the map's own); ``threshold``
    marks pixels ``>=`` it in the last panel, named by ``threshold_label``."""
    rgb = _enlarge(_rgb_uint8(image))
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
    labels = ["image", "ground truth" if mask is not None else "ground truth: none",
              f"anomaly map ({lo:.3g} .. {hi:.3g})",
              "no pixel threshold" if threshold is None else (threshold_label or f"pixels >= {threshold:.4g}")]
    font = ImageFont.load_default(size=_FONT)
    top = _PAD + 2 * _LINE + _LINE  # title, caption, panel labels
    canvas = Image.new("RGB", (4 * w + 5 * _PAD, top + h + 2 * _LINE + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), _fit(draw, title, font, canvas.width - 2 * _PAD), fill="black", font=font)
    draw.text((_PAD, _PAD + _LINE), _fit(draw, caption, font, canvas.width - 2 * _PAD), fill="#333", font=font)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        left = _PAD + i * (w + _PAD)
        canvas.paste(Image.fromarray(panel), (left, top))
        draw.text((left, top - _LINE), _fit(draw, label, font, w), fill="black", font=font)
    _colour_scale(canvas, draw, font, _PAD + 2 * (w + _PAD), top + h + 4, w, lo, hi)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def _enlarge(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    factor = max(1, -(-MIN_PANEL // max(h, w)))
    if factor == 1:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w * factor, h * factor), Image.NEAREST))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image)


def _mask_panel(mask: np.ndarray | None, h: int, w: int) -> np.ndarray:
    if mask is None:
        return np.full((h, w, 3), 235, dtype=np.uint8)
    binary = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    return np.repeat(np.asarray(binary)[..., None], 3, axis=2)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    return ((1.0 - alpha) * base + alpha * colour).clip(0, 255).astype(np.uint8)


def _colour_scale(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, left: int, top: int, width: int,
                  lo: float, hi: float) -> None:
    """A jet gradient under the heat-map panel with its end values."""
    gradient = (colormaps["jet"](np.linspace(0.0, 1.0, width))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(gradient[None], 6, axis=0)), (left, top))
    draw.text((left, top + 8), f"{lo:.3g}", fill="black", font=font)
    label = f"{hi:.3g}"
    draw.text((left + width - int(draw.textlength(label, font=font)), top + 8), label, fill="black", font=font)
