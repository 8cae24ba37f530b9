"""Fusion rules: normalisers fitted on reference normals, mean/max/weighted fusion, the
non-negative logistic stacking and its cross-validated scores, the paired bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics import roc_auc_score

from adlib.ensemble.fusion import cross_validated_stacking, fit_stacking, fuse, stratified_folds
from adlib.ensemble.normalization import Normalizer
from adlib.reporting.stats import paired_bootstrap_auroc_difference


def test_normalizers_use_the_reference_normals_and_round_trip():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    scores = np.array([2.5, 10.0, 1.0, 0.0])
    z = Normalizer.fit("zscore", reference)
    assert z(scores) == pytest.approx((scores - 2.5) / np.std(reference))
    assert Normalizer.fit("minmax", reference)(scores) == pytest.approx([0.5, 3.0, 0.0, -1 / 3])
    rank = Normalizer.fit("rank", reference)
    assert rank(scores) == pytest.approx([0.5, 1.0, 0.0, 0.0])  # share of reference normals below
    assert np.all(np.diff(rank(np.linspace(1, 4, 50))) >= 0)
    ties = Normalizer.fit("rank", [1.0, 1.0, 1.0, 5.0])
    assert ties(np.array([1.0]))[0] == pytest.approx(1 / 3, abs=0.01)  # mid-point of the tied quantiles (0 to 2/3)
    for method in ("zscore", "minmax", "rank"):
        fitted = Normalizer.fit(method, reference)
        assert Normalizer.from_dict(fitted.to_dict())(scores) == pytest.approx(fitted(scores))
        assert np.isfinite(Normalizer.fit(method, np.ones(3))(scores)).all()  # constant reference
    maps = z(np.ones((2, 4, 4), dtype=np.float16), np.float32)
    assert maps.dtype == np.float32 and maps.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="unknown normalisation 'softmax'"):
        Normalizer.fit("softmax", reference)
    with pytest.raises(ValueError, match="needs reference normal images"):
        Normalizer.fit("zscore", [])


def test_fusion_rules():
    stack = np.array([[0.0, 2.0], [1.0, 4.0]])  # models x images
    assert fuse(stack, "mean").tolist() == [0.5, 3.0]
    assert fuse(stack, "max").tolist() == [1.0, 4.0]
    assert fuse(stack, "weighted", [2.0, 0.5], intercept=1.0).tolist() == [1.5, 7.0]
    maps = np.stack([np.zeros((3, 2, 2)), np.ones((3, 2, 2))]).astype(np.float32)
    assert fuse(maps, "weighted", [1.0, 3.0]).shape == (3, 2, 2)
    with pytest.raises(ValueError, match="unknown fusion 'median'"):
        fuse(stack, "median")
    with pytest.raises(ValueError, match="needs weights"):
        fuse(stack, "weighted")


def _objective(x, y, theta, c=1.0):
    n = len(y)
    balance = np.where(y == 1, n / (2.0 * y.sum()), n / (2.0 * (n - y.sum())))
    z = x @ theta[:-1] + theta[-1]
    return balance @ (np.logaddexp(0, z) - y * z) + 0.5 / c * theta[:-1] @ theta[:-1]


def test_stacking_minimises_the_balanced_regularised_logistic_loss_with_non_negative_weights():
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.3).astype(int)
    x = rng.normal(size=(60, 3)) + np.outer(y, [2.0, 0.5, -1.5])  # the third model points the wrong way
    w, b = fit_stacking(x, y)
    assert w[0] > w[1] > 0 and w[2] == 0.0
    reference = minimize(lambda t: _objective(x, y, t), np.r_[np.ones(3) / 3, 0.0], method="L-BFGS-B",
                         bounds=[(0, None)] * 3 + [(None, None)], options={"ftol": 1e-15, "gtol": 1e-10})
    assert _objective(x, y, np.r_[w, b]) <= reference.fun + 1e-7
    assert np.r_[w, b] == pytest.approx(reference.x, abs=1e-4)
    with pytest.raises(ValueError, match="normal and anomalous"):
        fit_stacking(x, np.zeros(60, dtype=int))


def test_cross_validated_stacking_scores_each_image_with_a_model_that_did_not_see_it():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(20, int), np.ones(10, int)]
    x = rng.normal(size=(30, 2)) + np.outer(y, [1.0, 1.0])
    folds = stratified_folds(y, 5, seed=0)
    assert all(np.bincount(folds[y == 1]) == 2) and all(np.bincount(folds[y == 0]) == 4)
    out = cross_validated_stacking(x, y, seed=0)
    w, b = fit_stacking(x[folds != 0], y[folds != 0])
    assert out[folds == 0] == pytest.approx(x[folds == 0] @ w + b)
    w_all, b_all = fit_stacking(x, y)
    assert not np.allclose(out, x @ w_all + b_all)
    assert cross_validated_stacking(x[:21], y[:21]) is None  # one anomalous image: no folds


def test_paired_bootstrap_of_the_auroc_difference():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    a = rng.normal(size=80) + 2.0 * labels
    b = a + rng.normal(size=80) * 2.0  # the same signal with extra noise: worse
    result = paired_bootstrap_auroc_difference(labels, a, b, n_boot=500, seed=0)
    assert result["auroc_a"] == pytest.approx(roc_auc_score(labels, a))
    assert result["difference"] == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))
    low, high = np.quantile(result["replicates"], [0.025, 0.975])
    assert low < result["difference"] < high and low > 0  # a is reliably better
    same = paired_bootstrap_auroc_difference(labels, a, a, n_boot=50)
    assert np.all(same["replicates"] == 0)  # paired: identical scores never differ
    assert paired_bootstrap_auroc_difference(np.zeros(5, int), a[:5], b[:5])["difference"] is None
