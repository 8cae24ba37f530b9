"""The four threshold methods, confusion matrices, oracle vs transferred reports."""
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, roc_curve

from adlib.evaluation import METHODS, apply_threshold, fit_threshold, fit_thresholds, threshold_report
from adlib.evaluation.thresholds import CONFUSION_KEYS


def _data(seed=0, n=80):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = rng.normal(size=n) + 1.2 * y
    return y, s


def _f1_at(y, s, t):
    pred = s >= t
    tp = np.sum(pred & (y == 1))
    return 2 * tp / (pred.sum() + y.sum())


@pytest.mark.parametrize("seed", range(3))
def test_f1_methods_pick_the_best_grid_candidate(seed):
    y, s = _data(seed)
    grids = {"f1_percentile": np.percentile(s, np.linspace(0, 100, 201)),
             "f1_uniform": np.linspace(s.min(), s.max(), 201)}
    for method, grid in grids.items():
        fitted = fit_threshold(method, y, s)
        best = max(_f1_at(y, s, t) for t in grid)
        assert _f1_at(y, s, fitted.threshold) == pytest.approx(best)
        assert f1_score(y, s >= fitted.threshold) == pytest.approx(best)
        assert apply_threshold(y, s, fitted.threshold)["f1"] == pytest.approx(best)


@pytest.mark.parametrize("seed", range(3))
def test_youden_matches_sklearn_roc(seed):
    y, s = _data(seed)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    fitted = fit_threshold("roc_youden", y, s)
    assert fitted.threshold == pytest.approx(thr[np.argmax(tpr - fpr)])
    res = apply_threshold(y, s, fitted.threshold)
    assert res["recall"] - (1 - res["specificity"]) == pytest.approx(np.max(tpr - fpr))


def test_percentile_95_uses_normal_scores_only():
    y = np.r_[np.zeros(100, int), np.ones(5, int)]
    s = np.r_[np.arange(100.0), np.full(5, 1000.0)]
    assert fit_threshold("percentile_95", y, s).threshold == pytest.approx(np.percentile(np.arange(100.0), 95))
    # works with normal images only
    assert fit_threshold("percentile_95", y[:100], s[:100]).threshold == pytest.approx(94.05)


def test_no_anomalies_f1_and_youden_refuse_with_note():
    fitted = fit_thresholds(np.zeros(20, int), np.linspace(0, 1, 20), what="calibration images")
    for method in ("f1_percentile", "f1_uniform", "roc_youden"):
        assert fitted[method].threshold is None
        assert "no anomalous calibration images" in fitted[method].note
    assert fitted["percentile_95"].threshold is not None


def test_no_normals_percentile_refuses():
    fitted = fit_thresholds(np.ones(5, int), np.linspace(0, 1, 5))
    assert all(f.threshold is None and f.note for f in fitted.values())


def test_separable_data_reaches_f1_one():
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    s = np.r_[np.linspace(0, 1, 10), np.linspace(2, 3, 10)]
    for method in ("f1_percentile", "f1_uniform", "roc_youden"):
        assert apply_threshold(y, s, fit_threshold(method, y, s).threshold)["f1"] == 1.0


def test_apply_threshold_matches_sklearn_confusion():
    y, s = _data(3)
    res = apply_threshold(y, s, 0.5)
    tn, fp, fn, tp = confusion_matrix(y, (s >= 0.5).astype(int)).ravel()
    assert (res["tn"], res["fp"], res["fn"], res["tp"]) == (tn, fp, fn, tp)
    assert res["accuracy"] == pytest.approx((tp + tn) / len(y))
    assert res["precision"] == pytest.approx(tp / (tp + fp))
    assert res["recall"] == pytest.approx(tp / (tp + fn))
    assert res["specificity"] == pytest.approx(tn / (tn + fp))
    assert set(res) == set(CONFUSION_KEYS)


def test_apply_threshold_undefined_ratios_are_none():
    res = apply_threshold([0, 0, 1], [0.1, 0.2, 0.3], threshold=5.0)  # nothing flagged
    assert res["precision"] is None and res["recall"] == 0.0 and res["f1"] == 0.0
    res = apply_threshold([0, 0], [0.1, 0.2], threshold=5.0)  # no anomalies, nothing flagged
    assert res["recall"] is None and res["f1"] is None and res["specificity"] == 1.0


def test_report_oracle_and_transferred():
    y, s = _data(4)
    cy, cs = _data(5, n=40)
    report = threshold_report(y, s, cy, cs)
    assert set(report) == {"thresholds", "transferred_thresholds", "notes"}
    assert set(report["thresholds"]) == set(METHODS) == set(report["transferred_thresholds"])
    assert report["notes"] == []
    for method in METHODS:
        oracle, moved = report["thresholds"][method], report["transferred_thresholds"][method]
        assert oracle["threshold"] == pytest.approx(fit_threshold(method, y, s).threshold)
        assert moved["threshold"] == pytest.approx(fit_threshold(method, cy, cs).threshold)
        assert moved["tp"] + moved["fn"] + moved["tn"] + moved["fp"] == len(y)  # applied to test
    # the oracle F1 is optimal on the test grid, so transferring cannot beat it there
    assert report["thresholds"]["f1_percentile"]["f1"] >= report["transferred_thresholds"]["f1_percentile"]["f1"] - 1e-12


def test_report_with_normal_only_calibration():
    y, s = _data(6)
    report = threshold_report(y, s, np.zeros(30, int), np.random.default_rng(0).normal(size=30))
    moved = report["transferred_thresholds"]
    assert moved["f1_percentile"] is None and moved["roc_youden"] is None
    assert moved["percentile_95"] is not None
    assert any(n.startswith("transferred_thresholds.f1_uniform: no anomalous calibration images")
               for n in report["notes"])
    assert threshold_report(y, s)["transferred_thresholds"] is None


def test_bad_method_and_half_calibration():
    with pytest.raises(ValueError, match="unknown threshold method 'otsu'"):
        fit_threshold("otsu", [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="both calib_labels and calib_scores"):
        threshold_report([0, 1], [0.1, 0.2], calib_labels=[0, 1])
