"""Results text in the original specification's layout, metrics summary, and the PNG plots."""
import json

import numpy as np
import pytest

from adlib.evaluation import PixelMetrics, build_metrics, format_results_txt
from adlib.evaluation.plots import plot_overlay, plot_roc_pr, plot_score_histogram

SEED_LAYOUT = """=== Image-level Results ===
AUROC: 0.987 (98.7%)
AUPR: 0.991 (99.1%)

=== Thresholds ===
F1 (Percentile): 0.234 | F1: 0.915
F1 (Uniform): 0.236 | F1: 0.916
ROC (Youden J): 0.241 | Sensitivity: 0.945, Specificity: 0.898
Percentile (95%): 0.189

=== Confusion Matrix (F1 Threshold) ===
TP=89, FN=5, TN=82, FP=11
Accuracy: 0.912, Precision: 0.887, Recall: 0.945
"""


def _result(threshold, f1=0.5, recall=0.5, specificity=0.5, tp=1, fn=1, tn=1, fp=1, accuracy=0.5, precision=0.5):
    return dict(threshold=threshold, f1=f1, recall=recall, specificity=specificity, tp=tp, fn=fn, tn=tn, fp=fp,
                accuracy=accuracy, precision=precision)


def test_seed_layout_is_reproduced():
    metrics = {
        "image_auroc": 0.987, "image_aupr": 0.991, "image_f1_max": 0.93,
        "pixel_auroc": 0.97, "pixel_aupro": 0.9, "notes": [],
        "thresholds": {
            "f1_percentile": _result(0.234, f1=0.915, tp=89, fn=5, tn=82, fp=11, accuracy=0.912,
                                     precision=0.887, recall=0.945, specificity=0.882),
            "f1_uniform": _result(0.236, f1=0.916),
            "roc_youden": _result(0.241, recall=0.945, specificity=0.898),
            "percentile_95": _result(0.189),
        },
        "transferred_thresholds": None,
    }
    text = format_results_txt(metrics)
    assert text.startswith(SEED_LAYOUT)
    assert "Pixel AUROC: 0.970 (97.0%)" in text and "AUPRO (FPR <= 0.3): 0.900 (90.0%)" in text
    assert "Transferred" not in text
    assert format_results_txt(metrics, title="mvtec / bottle / stfpm").startswith("mvtec / bottle / stfpm\n\n" + SEED_LAYOUT)


def test_missing_values_show_reasons_and_transferred_section():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20, int), np.ones(10, int)]
    scores = rng.normal(size=30) + labels
    pm = PixelMetrics()
    pm.update(rng.random((2, 8, 8)), np.zeros((2, 8, 8), dtype=bool))  # no defects in the masks
    metrics = build_metrics(labels, scores, pm, calib_labels=np.zeros(10, int), calib_scores=rng.normal(size=10))
    json.dumps(metrics)  # plain JSON types only
    assert metrics["pixel_auroc"] is None and metrics["n_anomalous"] == 10
    text = format_results_txt(metrics)
    assert "Pixel AUROC: n/a (no anomalous pixels in the ground-truth masks of 2 images)" in text
    assert "=== Transferred Thresholds (fitted on the calibration split, applied to the test split) ===" in text
    assert "F1 (Percentile): n/a (no anomalous calibration images (all 10 normal)" in text
    # only the 95th percentile transfers from normal-only calibration data
    assert "=== Transferred Confusion Matrix (Percentile (95%) Threshold) ===" in text
    assert "=== Notes ===" not in text  # every note was shown next to its value


def test_single_class_test_set_text():
    metrics = build_metrics(np.zeros(6, int), np.linspace(0, 1, 6))
    text = format_results_txt(metrics)
    assert "AUROC: n/a (no anomalous test images (all 6 normal))" in text
    assert "Percentile (95%): 0.950" in text
    assert "=== Confusion Matrix (F1 Threshold) ===\nn/a (no anomalous test images" in text
    assert "Pixel AUROC: n/a (no anomaly maps or masks)" in text


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs_atomically(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(15, int), np.ones(10, int)]
    scores = rng.normal(size=25) + labels
    thresholds = {"f1_percentile": 0.5, "roc_youden": 0.4, "percentile_95": None}
    paths = [
        plot_score_histogram(labels, scores, thresholds, tmp_path / "hist.png", title="histogram"),
        plot_roc_pr(labels, scores, tmp_path / "curves.png", title="curves"),
        plot_overlay(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), rng.random((32, 32)) > 0.8,
                     rng.random((16, 16)), 0.7, tmp_path / "overlays" / "a.png", title="overlay"),
        plot_overlay(rng.random((3, 32, 32)), None, rng.random((32, 32)) * 5, None, tmp_path / "b.png"),
    ]
    for path in paths:
        assert path.exists() and _is_png(path) and path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.png", "b.png", "curves.png", "hist.png"]


def test_plots_handle_single_class_and_empty(tmp_path):
    plot_score_histogram(np.zeros(5, int), np.full(5, 0.3), {}, tmp_path / "h1.png")
    plot_score_histogram([], [], None, tmp_path / "h2.png")
    plot_roc_pr(np.ones(4, int), np.arange(4.0), tmp_path / "c.png")
    assert all(_is_png(tmp_path / n) for n in ("h1.png", "h2.png", "c.png"))


def test_overlay_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="anomaly map must be"):
        plot_overlay(np.zeros((8, 8, 3)), None, np.zeros((2, 8, 8)), 0.5, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
