"""Image-level metrics: AUROC, average precision (AUPR) and F1-max, exact (no binning).

Convention used everywhere in :mod:`adlib.evaluation`: label 1 = anomalous, 0 = normal; a
higher score means more anomalous; an image is predicted anomalous when ``score >= threshold``.

Metrics that need both classes return ``None`` (never raise) when only one class is present;
:func:`image_metrics` also says why in its ``notes``. Notes follow the ``"<key>: <reason>"``
convention so reports can print ``n/a (<reason>)`` next to the missing value.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def as_numpy(values: Any, dtype: Any = None) -> np.ndarray:
    """Array view of a numpy array, list or (CPU/GPU) torch tensor."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach()
        if values.dtype.is_floating_point:
            values = values.float()  # float16/bfloat16 -> float32 (bfloat16 has no numpy type)
        values = values.cpu().numpy()
    return np.asarray(values, dtype=dtype)


def check_binary(labels: Any, scores: Any, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``labels`` (0/1 or bool) and ``scores`` (finite floats), both 1-D.

    Raises ``ValueError`` naming the problem; returns ``(labels int8, scores float64)``.
    """
    y = as_numpy(labels)
    s = as_numpy(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"{what}: labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{what}: {y.size} labels but {s.size} scores; pass one label per score")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (anomalous), found {bad.tolist()}")
    if not np.isfinite(s).all():
        n_bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"{what}: {n_bad} of {s.size} scores are NaN or infinite; check the model output")
    return y.astype(np.int8), s


def single_class_reason(labels: np.ndarray, what: str = "test images") -> str | None:
    """Why a two-class metric cannot be computed, or ``None`` when both classes are present."""
    n_anom = int(np.count_nonzero(labels))
    n_norm = int(labels.size - n_anom)
    if labels.size == 0:
        return f"no {what}"
    if n_anom == 0:
        return f"no anomalous {what} (all {n_norm} normal)"
    if n_norm == 0:
        return f"no normal {what} (all {n_anom} anomalous)"
    return None


class BinaryCurve(NamedTuple):
    """Counts at every distinct score, from the highest threshold to the lowest.

    At ``thresholds[k]`` the images with ``score >= thresholds[k]`` are predicted anomalous;
    ``tps[k]`` / ``fps[k]`` of them are truly anomalous / normal.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    n_pos: int
    n_neg: int


def binary_curve(labels: Any, scores: Any) -> BinaryCurve:
    """Cumulative true/false positive counts at each distinct score (ties grouped)."""
    y, s = check_binary(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each group of equal scores
    last = np.flatnonzero(np.diff(s_sorted)) if s.size else np.empty(0, dtype=np.int64)
    last = np.r_[last, s.size - 1] if s.size else last
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = (last + 1) - tps
    n_pos = int(y.sum())
    return BinaryCurve(s_sorted[last], tps, fps, n_pos, int(y.size) - n_pos)


def auc_from_counts(tps: np.ndarray, fps: np.ndarray, n_pos: float, n_neg: float) -> float:
    """ROC AUC (trapezoidal, ties get half credit) from cumulative counts ordered by falling threshold."""
    tpr = np.r_[0.0, np.asarray(tps, dtype=np.float64) / n_pos]
    fpr = np.r_[0.0, np.asarray(fps, dtype=np.float64) / n_neg]
    return float(np.clip(trapezoid(tpr, fpr), 0.0, 1.0))


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal integral of ``y`` over ``x`` (numpy-version independent)."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0) if y.size > 1 else 0.0


def image_auroc(labels: Any, scores: Any) -> float | None:
    """Area under the ROC curve; ``None`` if only one class is present."""
    curve = binary_curve(labels, scores)
    if curve.n_pos == 0 or curve.n_neg == 0:
        return None
    return auc_from_counts(curve.tps, curve.fps, curve.n_pos, curve.n_neg)


def average_precision(labels: Any, scores: Any) -> float | None:
    """Average precision (step-wise area under the precision-recall curve, as scikit-learn)."""
    curve = binary_curve(labels, scores)
    if curve.n_pos == 0 or curve.n_neg == 0:
        return None
    precision = curve.tps / (curve.tps + curve.fps)
    recall_steps = np.diff(np.r_[0, curve.tps]) / curve.n_pos
    return float(np.sum(recall_steps * precision))


def f1_max(labels: Any, scores: Any) -> float | None:
    """Best F1 over all thresholds (each distinct score); ``None`` if only one class is present."""
    curve = binary_curve(labels, scores)
    if curve.n_pos == 0 or curve.n_neg == 0:
        return None
    f1 = 2 * curve.tps / (curve.tps + curve.fps + curve.n_pos)
    return float(f1.max())


def image_metrics(labels: Any, scores: Any) -> dict[str, Any]:
    """Image-level part of ``metrics.json``: AUROC, AUPR, F1-max, counts and notes."""
    y, s = check_binary(labels, scores, "image scores")
    reason = single_class_reason(y)
    out: dict[str, Any] = {
        "image_auroc": image_auroc(y, s),
        "image_aupr": average_precision(y, s),
        "image_f1_max": f1_max(y, s),
        "n_test": int(y.size),
        "n_normal": int(y.size - y.sum()),
        "n_anomalous": int(y.sum()),
        "notes": [],
    }
    if reason:
        out["notes"] = [f"{key}: {reason}" for key in ("image_auroc", "image_aupr", "image_f1_max")]
    return out
