"""The original specification's four decision thresholds, their confusion matrices, and oracle vs transferred use.

Methods (``METHODS``), each fitted on one set of (labels, scores):

* ``f1_percentile``: the threshold with the best F1 among the 0, 0.5, ..., 100th percentiles
  of all scores (201 candidates).
* ``f1_uniform``: the best F1 among 201 evenly spaced values from the lowest to the highest score.
* ``roc_youden``: the ROC operating point maximising Youden's J = TPR - FPR (every distinct
  score is a candidate).
* ``percentile_95``: the 95th percentile (linear interpolation) of the normal scores; needs no
  anomalies, so it is the one method that can be fitted on normal images only.

An image is predicted anomalous when ``score >= threshold``. The F1 and Youden methods need
both classes; without them they return no threshold and a note instead of picking the minimum.

A model may also bring its own unsupervised decision rule (``MODEL_METHODS``; the model's
``decision_method``): ``nfa`` is U-Flow's a-contrario test, an image is anomalous when its
``decision`` statistic (``log10(1 / NFA)`` of its most significant position) is >= 0. Nothing is
fitted, so its row is the same in the oracle and the transferred tables; models without such a
rule have no row.

*Oracle* thresholds are fitted on the test split and applied to it (optimistic, what the
original specification reports); *transferred* thresholds are fitted on a calibration split and applied to the test
split (what a deployment would see).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from adlib.evaluation.metrics import binary_curve, check_binary, single_class_reason

METHODS = ("f1_percentile", "f1_uniform", "roc_youden", "percentile_95")
#: decision rules a model brings itself (AnomalyModel.decision_method), on AnomalyOutput.decision >= 0
MODEL_METHODS = ("nfa",)
ALL_METHODS = METHODS + MODEL_METHODS
METHOD_TITLES = {
    "f1_percentile": "F1 (Percentile)",
    "f1_uniform": "F1 (Uniform)",
    "roc_youden": "ROC (Youden J)",
    "percentile_95": "Percentile (95%)",
    "nfa": "A-contrario (NFA <= 1)",
}
GRID_SIZE = 201
CONFUSION_KEYS = ("threshold", "tp", "fn", "tn", "fp", "accuracy", "precision", "recall", "specificity", "f1")


@dataclasses.dataclass(frozen=True)
class FittedThreshold:
    """A fitted threshold, or ``threshold=None`` with the reason in ``note``."""

    method: str
    threshold: float | None
    note: str | None = None


def _best_f1(y: np.ndarray, s: np.ndarray, candidates: np.ndarray) -> float:
    """Candidate with the highest F1 (the lowest such candidate on ties)."""
    candidates = np.unique(candidates)
    s_sorted = np.sort(s)
    pos_sorted = np.sort(s[y == 1])
    predicted = s.size - np.searchsorted(s_sorted, candidates, side="left")
    tp = pos_sorted.size - np.searchsorted(pos_sorted, candidates, side="left")
    f1 = 2.0 * tp / (predicted + pos_sorted.size)  # 2TP / ((TP+FP) + (TP+FN))
    return float(candidates[int(np.argmax(f1))])


def _youden(y: np.ndarray, s: np.ndarray) -> float:
    curve = binary_curve(y, s)
    j = curve.tps / curve.n_pos - curve.fps / curve.n_neg
    return float(curve.thresholds[int(np.argmax(j))])


def fit_threshold(method: str, labels: Any, scores: Any, what: str = "images") -> FittedThreshold:
    """Fit one method on (labels, scores); see the module docstring for the definitions."""
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    y, s = check_binary(labels, scores, f"threshold fitting ({what})")
    if method == "percentile_95":
        normal = s[y == 0]
        if normal.size == 0:
            return FittedThreshold(method, None, f"no normal {what} to take the 95th percentile of")
        return FittedThreshold(method, float(np.percentile(normal, 95)))
    reason = single_class_reason(y, what)
    if reason:
        return FittedThreshold(method, None, f"{reason}; {METHOD_TITLES[method]} needs both classes")
    if method == "f1_percentile":
        return FittedThreshold(method, _best_f1(y, s, np.percentile(s, np.linspace(0, 100, GRID_SIZE))))
    if method == "f1_uniform":
        return FittedThreshold(method, _best_f1(y, s, np.linspace(s.min(), s.max(), GRID_SIZE)))
    return FittedThreshold(method, _youden(y, s))


def fit_thresholds(labels: Any, scores: Any, what: str = "images") -> dict[str, FittedThreshold]:
    """All four methods fitted on (labels, scores)."""
    return {method: fit_threshold(method, labels, scores, what) for method in METHODS}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def apply_threshold(labels: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Confusion counts and rates at ``threshold`` (``score >= threshold`` -> anomalous).

    Ratios with a zero denominator (e.g. precision when nothing is flagged) are ``None``.
    """
    y, s = check_binary(labels, scores, "threshold evaluation")
    pred = s >= threshold
    truth = y == 1
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(np.count_nonzero(~pred & ~truth))
    return {
        "threshold": float(threshold),
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "accuracy": _ratio(tp + tn, y.size),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _applied(fitted: dict[str, FittedThreshold], labels: np.ndarray, scores: np.ndarray,
             key: str, notes: list[str]) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for method, fit in fitted.items():
        if fit.threshold is None:
            out[method] = None
            notes.append(f"{key}.{method}: {fit.note}")
        else:
            out[method] = apply_threshold(labels, scores, fit.threshold)
    return out


def threshold_report(test_labels: Any, test_scores: Any, calib_labels: Any = None,
                     calib_scores: Any = None, decision: Any = None, decision_method: str | None = None
                     ) -> dict[str, Any]:
    """Oracle and (if a calibration split is given) transferred thresholds, as in ``metrics.json``.

    ``decision`` (with its ``decision_method``, one of ``MODEL_METHODS``): the test images'
    statistics of a model's own rule, added as one more method (anomalous when >= 0).

    Returns ``{"thresholds": {method: confusion | None}, "transferred_thresholds": {...} | None,
    "notes": ["thresholds.<method>: <reason>", ...]}``.
    """
    y, s = check_binary(test_labels, test_scores, "test scores")
    notes: list[str] = []
    report: dict[str, Any] = {
        "thresholds": _applied(fit_thresholds(y, s, "test images"), y, s, "thresholds", notes),
        "transferred_thresholds": None,
    }
    if (calib_labels is None) != (calib_scores is None):
        raise ValueError("pass both calib_labels and calib_scores, or neither")
    if calib_labels is not None:
        cy, cs = check_binary(calib_labels, calib_scores, "calibration scores")
        fitted = fit_thresholds(cy, cs, "calibration images")
        report["transferred_thresholds"] = _applied(fitted, y, s, "transferred_thresholds", notes)
    if (decision is None) != (decision_method is None):
        raise ValueError("pass both decision and decision_method, or neither")
    if decision is not None:
        if decision_method not in MODEL_METHODS:
            raise ValueError(f"unknown model decision rule {decision_method!r}; known rules: "
                             f"{', '.join(MODEL_METHODS)}")
        _, d = check_binary(y, decision, f"{decision_method} decision statistics")
        for key in ("thresholds", "transferred_thresholds"):
            if report[key] is not None:
                report[key][decision_method] = apply_threshold(y, d, 0.0)
    report["notes"] = notes
    return report


def deployed_threshold(metrics: dict, methods: tuple[str, ...] = METHODS) -> tuple[str, str, float] | None:
    """(method, "transferred" | "oracle", value) of the first of ``methods`` with a threshold in
    a run's metrics: transferred from the calibration split when there is one, else oracle."""
    for key, source in (("transferred_thresholds", "transferred"), ("thresholds", "oracle")):
        for method in methods:
            result = (metrics.get(key) or {}).get(method)
            if result:
                return method, source, float(result["threshold"])
    return None
