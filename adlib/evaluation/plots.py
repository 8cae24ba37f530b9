"""Run pictures: score histogram, ROC/PR curves, image overlays (PNG, written atomically).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never pyplot,
so no global backend or figure registry is touched (safe in workers and headless jobs).
Single-class data is drawn with what is available plus a note instead of failing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from adlib.evaluation.metrics import as_numpy, average_precision, binary_curve, check_binary, image_auroc
from adlib.evaluation.thresholds import METHOD_TITLES
from adlib.figures import new_figure, save_figure

_NORMAL_COLOR = "tab:blue"
_ANOMALY_COLOR = "tab:red"
_LINE_COLORS = ("black", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray")




def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)


def plot_score_histogram(labels: Any, scores: Any, thresholds: Mapping[str, float | None] | None,
                         path: str | os.PathLike, title: str = "") -> Path:
    """Histogram of normal vs anomalous image scores with a vertical line per threshold.

    ``thresholds`` maps a method name (or any label) to a value; ``None`` values are skipped.
    """
    y, s = check_binary(labels, scores, "histogram")
    fig, (ax,) = new_figure(6.0, 3.6)
    if s.size == 0:
        _note(ax, "no scores")
    else:
        lo, hi = float(s.min()), float(s.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        for value, name, color in ((0, "normal", _NORMAL_COLOR), (1, "anomalous", _ANOMALY_COLOR)):
            part = s[y == value]
            if part.size:
                ax.hist(part, bins=bins, alpha=0.55, color=color, label=f"{name} (n={part.size})")
        for i, (method, value) in enumerate((thresholds or {}).items()):
            if value is not None:
                ax.axvline(float(value), color=_LINE_COLORS[i % len(_LINE_COLORS)], linestyle="--",
                           linewidth=1.2, label=f"{METHOD_TITLES.get(method, method)}: {float(value):.4g}")
        ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("anomaly score")
        ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_roc_pr(labels: Any, scores: Any, path: str | os.PathLike, title: str = "") -> Path:
    """ROC curve (left) and precision-recall curve (right) of the image scores."""
    y, s = check_binary(labels, scores, "ROC/PR plot")
    fig, (ax_roc, ax_pr) = new_figure(8.0, 3.8, ncols=2)
    curve = binary_curve(y, s)
    if curve.n_pos and curve.n_neg:
        fpr = np.r_[0.0, curve.fps / curve.n_neg]
        tpr = np.r_[0.0, curve.tps / curve.n_pos]
        ax_roc.plot(fpr, tpr, color=_ANOMALY_COLOR, label=f"AUROC {image_auroc(y, s):.3f}")
        ax_roc.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        recall = np.r_[0.0, curve.tps / curve.n_pos]
        precision = np.r_[1.0, curve.tps / (curve.tps + curve.fps)]
        ax_pr.step(recall, precision, where="post", color=_NORMAL_COLOR,
                   label=f"AP {average_precision(y, s):.3f}")
        ax_pr.axhline(curve.n_pos / y.size, color="gray", linestyle=":", linewidth=1)
        ax_roc.legend(fontsize=8, loc="lower right")
        ax_pr.legend(fontsize=8, loc="lower left")
    else:
        message = f"undefined: {curve.n_neg} normal, {curve.n_pos} anomalous images"
        _note(ax_roc, "ROC " + message)
        _note(ax_pr, "PR " + message)
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="Precision-recall")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _display_image(image: Any) -> np.ndarray:
    img = as_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # CHW -> HWC
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3):
        raise ValueError(f"overlay image must be [H,W,3], [3,H,W] or [H,W], got shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    img = img.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:  # not in [0, 1]: stretch for display
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img


def plot_overlay(image: Any, mask: Any, amap: Any, threshold: float | None, path: str | os.PathLike,
                 title: str = "", vmin: float | None = None, vmax: float | None = None, caption: str = "",
                 threshold_label: str | None = None) -> Path:
    """Four panels: image | ground truth | heat map over the image | pixels above ``threshold``.

    ``mask`` may be ``None`` (no ground truth). ``amap`` may have a lower resolution than the
    image (it is stretched over it). ``vmin``/``vmax`` fix the heat-map colour range (one range
    for every picture of a run makes them comparable); by default each map uses its own range.
    ``threshold=None`` leaves the last panel with a note; ``threshold_label`` says what the
    threshold is. Drawn with Pillow (:mod:`adlib.evaluation.overlay`).
    """
    from adlib.evaluation.overlay import render_overlay

    img = _display_image(image)
    heat = as_numpy(amap, dtype=np.float32).squeeze()
    if heat.ndim != 2:
        raise ValueError(f"anomaly map must be [H,W], got shape {heat.shape}")
    mask_array = None if mask is None else as_numpy(mask).squeeze()
    return render_overlay(img, mask_array, heat, threshold, path, title, vmin, vmax, caption, threshold_label)
