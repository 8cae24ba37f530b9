"""Pure evaluation functions: image and pixel metrics, thresholds, results text, plots.

``adlib.evaluation.plots`` imports matplotlib, so it is loaded only when its names are used.
"""
from __future__ import annotations

from adlib.evaluation.metrics import average_precision, f1_max, image_auroc, image_metrics
from adlib.evaluation.pixel_metrics import PixelMetrics, aupro, aupro_exact, pixel_auroc
from adlib.evaluation.report_text import format_results_txt
from adlib.evaluation.summary import build_metrics
from adlib.evaluation.thresholds import (
    METHODS,
    FittedThreshold,
    apply_threshold,
    fit_threshold,
    fit_thresholds,
    threshold_report,
)

_PLOTS = ("plot_score_histogram", "plot_roc_pr", "plot_overlay")

__all__ = ["METHODS", "FittedThreshold", "PixelMetrics", "apply_threshold", "aupro", "aupro_exact",
           "average_precision", "build_metrics", "f1_max", "fit_threshold", "fit_thresholds",
           "format_results_txt", "image_auroc", "image_metrics", "pixel_auroc", "threshold_report",
           *_PLOTS]


def __getattr__(name: str):
    if name in _PLOTS:
        from adlib.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'adlib.evaluation' has no attribute {name!r}")
