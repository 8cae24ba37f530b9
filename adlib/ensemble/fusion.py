"""Combining the normalised scores (or maps) of several models into one.

* ``mean`` and ``max`` of the normalised values (the common choices for unsupervised outlier
  ensembles, Zimek et al., "Ensembles for unsupervised outlier detection", SIGKDD Explorations
  15(1), 2013);
* ``weighted``: ``sum_i w_i v_i + b`` with weights fitted on labelled calibration images by
  logistic stacking (Wolpert, "Stacked generalization", Neural Networks 5(2), 1992): an
  L2-regularised logistic regression on the normalised scores, normal and anomalous images
  weighted equally, weights constrained to be >= 0 so that no model's evidence counts against
  an anomaly (maps stay interpretable). Applied to maps with the same weights.

Selecting a weighted fusion by its score on the images it was fitted on would flatter it, so
:func:`cross_validated_stacking` gives out-of-fold fused scores for selection; the deployed
weights are then refitted on all calibration images.
"""
from __future__ import annotations

from typing import Any

import numpy as np

FUSIONS = ("mean", "max", "weighted")
#: inverse L2 strength of the stacking regression (as scikit-learn's ``C``)
STACKING_C = 1.0
#: folds of the cross-validated stacking scores (fewer when a class has fewer images)
STACKING_FOLDS = 5
#: projected Newton iterations (at most) and gradient tolerance per image of the stacking fit
NEWTON_ITERATIONS = 100
NEWTON_TOLERANCE = 1e-9


def check_fusion(rule: str) -> str:
    if rule not in FUSIONS:
        raise ValueError(f"unknown fusion {rule!r}; choose one of {', '.join(FUSIONS)}")
    return rule


def fuse(stack: np.ndarray, rule: str, weights: Any = None, intercept: float = 0.0) -> np.ndarray:
    """Fuse ``stack`` (models first: ``[M, ...]``) into one array of the remaining shape."""
    check_fusion(rule)
    if rule == "mean":
        return stack.mean(axis=0)
    if rule == "max":
        return stack.max(axis=0)
    if weights is None:
        raise ValueError("weighted fusion needs weights (fit them with fit_stacking)")
    w = np.asarray(weights, dtype=stack.dtype)
    return np.tensordot(w, stack, axes=1) + stack.dtype.type(intercept)


def stacking_problem(labels: np.ndarray) -> str | None:
    """Why stacking cannot be fitted on these labels, or ``None``."""
    n_anomalous = int(np.count_nonzero(labels))
    n_normal = int(labels.size - n_anomalous)
    if min(n_normal, n_anomalous) == 0:
        return (f"weighted fusion needs normal and anomalous calibration images, got {n_normal} normal and "
                f"{n_anomalous} anomalous")
    return None


def fit_stacking(features: np.ndarray, labels: np.ndarray, c: float = STACKING_C) -> tuple[np.ndarray, float]:
    """Non-negative weights and intercept of a class-balanced, L2-regularised logistic regression
    of ``labels`` (0/1) on ``features`` ``[n, M]``.

    Solved by projected Newton steps (Bertsekas, "Projected Newton methods for optimization
    problems with simple constraints", SIAM J. Control Optim. 20(2), 1982): weights at zero whose
    gradient pushes them below zero stay fixed, the others take a Newton step, and a backtracking
    line search keeps the projected point improving. A few iterations for M <= 5 models.
    """
    from scipy.special import expit

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    problem = stacking_problem(y)
    if problem:
        raise ValueError(problem)
    n, m = x.shape
    design = np.c_[x, np.ones(n)]
    balance = np.where(y == 1, n / (2.0 * y.sum()), n / (2.0 * (n - y.sum())))
    penalty = np.r_[np.full(m, 1.0 / c), 0.0]  # the intercept is not penalised

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        return float(balance @ (np.logaddexp(0.0, z) - y * z) + 0.5 * penalty @ theta ** 2)

    theta = np.r_[np.full(m, 1.0 / m), 0.0]
    for _ in range(NEWTON_ITERATIONS):
        p = expit(design @ theta)
        gradient = design.T @ (balance * (p - y)) + penalty * theta
        held = np.r_[(theta[:m] <= 0.0) & (gradient[:m] > 0.0), False]
        free = ~held
        if np.abs(gradient[free]).max() < NEWTON_TOLERANCE * n:
            break
        curvature = balance * p * (1.0 - p)
        hessian = (design[:, free] * curvature[:, None]).T @ design[:, free] + np.diag(penalty[free])
        step = np.zeros(m + 1)
        step[free] = -np.linalg.solve(hessian + 1e-12 * np.eye(int(free.sum())), gradient[free])
        before, size = loss(theta), 1.0
        while size > 1e-12:
            trial = theta + size * step
            trial[:m] = np.maximum(trial[:m], 0.0)
            if loss(trial) <= before + 1e-4 * gradient @ (trial - theta):
                break
            size /= 2.0
        else:
            break
        theta = trial
    return theta[:m].copy(), float(theta[m])


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold number in ``[0, k)`` per image; each class is shuffled and dealt round-robin, so
    every fold holds about the same share of normal and anomalous images."""
    folds = np.empty(len(labels), dtype=int)
    rng = np.random.default_rng(seed)
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        folds[members] = np.arange(len(members)) % k
    return folds


def cross_validated_stacking(features: np.ndarray, labels: np.ndarray, seed: int = 0,
                             folds: int = STACKING_FOLDS) -> np.ndarray | None:
    """Out-of-fold weighted-fusion scores (stratified folds), or ``None`` when a class has fewer
    than two images."""
    y = np.asarray(labels).astype(int)
    k = min(folds, int(y.sum()), int(y.size - y.sum()))
    if k < 2:
        return None
    fold = stratified_folds(y, k, seed)
    out = np.empty(y.size)
    for held in range(k):
        w, b = fit_stacking(features[fold != held], y[fold != held])
        out[fold == held] = features[fold == held] @ w + b
    return out
