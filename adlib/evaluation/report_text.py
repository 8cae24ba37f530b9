"""The original specification's ``results_{dataset}_{category}_{model}_thresholds.txt`` text, from ``metrics.json``.

The first three sections reproduce the original specification's layout exactly (image-level results, thresholds,
confusion matrix at the F1 threshold); pixel-level results, the transferred thresholds (when a
calibration split was used), run counts/timings and leftover notes follow. Missing values are
printed as ``n/a (<reason>)`` with the reason taken from the ``"<key>: <reason>"`` notes.
"""
from __future__ import annotations

from typing import Any, Mapping

from adlib.evaluation.thresholds import METHOD_TITLES, METHODS, MODEL_METHODS

_F1_METHODS = ("f1_percentile", "f1_uniform")


def _num(value: float) -> str:
    """Three decimals as in the original specification; scientific-ish for very small or large scores."""
    return f"{value:.3f}" if value == 0 or 0.01 <= abs(value) < 1e4 else f"{value:.4g}"


class _Writer:
    def __init__(self, metrics: Mapping[str, Any]):
        self.metrics = metrics
        self.notes: list[str] = [str(n) for n in metrics.get("notes") or []]
        self.used: set[int] = set()
        self.lines: list[str] = []

    def reason(self, key: str) -> str:
        prefix = f"{key}: "
        for i, note in enumerate(self.notes):
            if note.startswith(prefix):
                self.used.add(i)
                return note[len(prefix):]
        return "not computed"

    def na(self, key: str) -> str:
        return f"n/a ({self.reason(key)})"

    def percent(self, key: str) -> str:
        value = self.metrics.get(key)
        return self.na(key) if value is None else f"{value:.3f} ({100 * value:.1f}%)"

    @staticmethod
    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def section(self, title: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(f"=== {title} ===")

    def thresholds(self, group: str, detailed: bool = False) -> None:
        """One line per method: the original specification's wording, or F1, sensitivity and
        specificity for all if detailed (and for a model's own rule, listed only where present)."""
        results = self.metrics.get(group) or {}
        for method in (*METHODS, *(m for m in MODEL_METHODS if results.get(m) is not None)):
            title, res = METHOD_TITLES[method], results.get(method)
            if res is None:
                self.lines.append(f"{title}: {self.na(f'{group}.{method}')}")
            elif detailed or method in MODEL_METHODS:
                self.lines.append(f"{title}: {_num(res['threshold'])} | F1: {self.rate(res['f1'])}, "
                                  f"Sensitivity: {self.rate(res['recall'])}, "
                                  f"Specificity: {self.rate(res['specificity'])}")
            elif method in _F1_METHODS:
                self.lines.append(f"{title}: {_num(res['threshold'])} | F1: {self.rate(res['f1'])}")
            elif method == "roc_youden":
                self.lines.append(f"{title}: {_num(res['threshold'])} | Sensitivity: {self.rate(res['recall'])}, "
                                  f"Specificity: {self.rate(res['specificity'])}")
            else:
                self.lines.append(f"{title}: {_num(res['threshold'])}")

    def confusion(self, group: str, heading: str, methods: tuple[str, ...]) -> None:
        """Confusion matrix at the first method of ``methods`` that has a threshold."""
        results = self.metrics.get(group) or {}
        method = next((m for m in methods if results.get(m) is not None), None)
        self.section(heading if method in _F1_METHODS or method is None
                     else heading.replace("F1 Threshold", f"{METHOD_TITLES[method]} Threshold"))
        if method is None:
            self.lines.append(f"n/a ({self.reason(f'{group}.{methods[0]}')})")
            return
        r = results[method]
        self.lines.append(f"TP={r['tp']}, FN={r['fn']}, TN={r['tn']}, FP={r['fp']}")
        self.lines.append(f"Accuracy: {self.rate(r['accuracy'])}, Precision: {self.rate(r['precision'])}, "
                          f"Recall: {self.rate(r['recall'])}")
        self.lines.append(f"Specificity: {self.rate(r['specificity'])}, F1: {self.rate(r['f1'])} "
                          f"(threshold {_num(r['threshold'])}, {METHOD_TITLES[method]})")


def format_results_txt(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Render ``metrics`` (the ``metrics.json`` dict) in the original specification's results text layout."""
    w = _Writer(metrics)
    if title:
        w.lines += [title]
    w.section("Image-level Results")
    w.lines.append(f"AUROC: {w.percent('image_auroc')}")
    w.lines.append(f"AUPR: {w.percent('image_aupr')}")
    w.section("Thresholds")
    w.thresholds("thresholds")
    w.confusion("thresholds", "Confusion Matrix (F1 Threshold)", _F1_METHODS)

    w.section("Additional Image-level Results")
    w.lines.append(f"F1-max: {w.percent('image_f1_max')}")
    w.section("Pixel-level Results")
    w.lines.append(f"Pixel AUROC: {w.percent('pixel_auroc')}")
    w.lines.append(f"AUPRO (FPR <= 0.3): {w.percent('pixel_aupro')}")
    if metrics.get("transferred_thresholds") is not None:
        w.section("Transferred Thresholds (fitted on the calibration split, applied to the test split)")
        w.thresholds("transferred_thresholds", detailed=True)
        # fall back to the other methods: with normal-only calibration data only percentile_95 exists
        w.confusion("transferred_thresholds", "Transferred Confusion Matrix (F1 Threshold)", tuple(METHOD_TITLES))

    counts = [k for k in ("n_test", "n_normal", "n_anomalous") if metrics.get(k) is not None]
    timings = [k for k in ("inference_ms_b1", "inference_ms_batch") if metrics.get(k) is not None]
    if counts or timings:
        w.section("Run")
        if counts:
            names = {"n_test": "total", "n_normal": "normal", "n_anomalous": "anomalous"}
            w.lines.append("Test images: " + ", ".join(f"{names[k]}={metrics[k]}" for k in counts))
        if timings:
            w.lines.append("Inference: " + ", ".join(
                f"{metrics[k]:.2f} ms/img ({'batch 1' if k.endswith('b1') else 'batch N'})" for k in timings))
    rest = [note for i, note in enumerate(w.notes) if i not in w.used]
    if rest:
        w.section("Notes")
        w.lines += [f"- {note}" for note in rest]
    return "\n".join(w.lines) + "\n"
