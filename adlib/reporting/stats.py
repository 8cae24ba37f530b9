"""Ranking statistics over runs: Friedman test, Nemenyi critical difference and its diagram,
bootstrap confidence intervals of image AUROC.

References:
  J. Demšar, "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7, 2006
  (Friedman test, Nemenyi post-hoc critical difference, the CD diagram);
  B. Efron and R. Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile intervals).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from adlib.io import write_json
from adlib.reporting.leaderboard import category_ranks, write_table
from adlib.reporting.runs import RUN_KEYS, read_scores


# ----------------------------------------------------------------------------------------------
# Friedman + Nemenyi
def rank_matrix(ranks: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Blocks (dataset/category) x models of ``metric``, keeping only blocks where every model has a value.

    Models without any value (e.g. image-level models under a pixel metric) are left out first.
    """
    wide = ranks.pivot_table(index=["dataset", "category"], columns="model", values=metric, aggfunc="mean")
    return wide.dropna(axis=1, how="all").dropna(axis=0, how="any")


def friedman_test(values: pd.DataFrame) -> dict[str, Any]:
    """Friedman's test on a blocks x models table of scores (higher = better).

    Needs at least 3 models and 2 blocks; otherwise the statistic is ``None`` with a note.
    """
    from scipy.stats import friedmanchisquare

    k, n = values.shape[1], values.shape[0]
    result: dict[str, Any] = {"statistic": None, "p_value": None, "n_models": int(k), "n_blocks": int(n),
                              "note": None}
    if k < 3:
        result["note"] = f"the Friedman test needs at least 3 models with results on the same categories; got {k}"
    elif n < 2:
        result["note"] = f"the Friedman test needs at least 2 categories where every model has a result; got {n}"
    else:
        with np.errstate(all="ignore"):
            stat, p = friedmanchisquare(*[values[c].to_numpy(float) for c in values.columns])
        if np.isfinite(stat):
            result["statistic"], result["p_value"] = float(stat), float(p)
        else:
            result["note"] = "every model is tied on every category: the Friedman statistic is undefined"
    return result


def nemenyi_critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of mean ranks: q_alpha * sqrt(k (k + 1) / (6 n)).

    ``q_alpha`` is the studentized range quantile (infinite degrees of freedom) divided by sqrt(2),
    as tabulated by Demšar (2006).
    """
    from scipy.stats import studentized_range

    if k < 2 or n < 1:
        raise ValueError(f"the critical difference needs >= 2 models and >= 1 block, got k={k}, n={n}")
    q_alpha = float(studentized_range.ppf(1.0 - alpha, k, np.inf)) / math.sqrt(2.0)
    return q_alpha * math.sqrt(k * (k + 1) / (6.0 * n))


def mean_ranks(values: pd.DataFrame) -> pd.Series:
    """Mean rank of each model over the blocks of a blocks x models table (1 = best)."""
    return values.rank(axis=1, ascending=False, method="average").mean(axis=0).sort_values()


def not_different_groups(ranks: pd.Series, cd: float) -> list[list[str]]:
    """Maximal runs of models (sorted by mean rank) whose rank spread is within ``cd``."""
    names, values = list(ranks.index), ranks.to_numpy(float)
    groups: list[tuple[int, int]] = []
    for i in range(len(values)):
        j = i
        while j + 1 < len(values) and values[j + 1] - values[i] <= cd:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in groups):
            groups.append((i, j))
    return [names[a:b + 1] for a, b in groups]


def plot_cd_diagram(ranks: pd.Series, cd: float | None, path: str | os.PathLike, title: str = "") -> Path:
    """Demšar's critical-difference diagram: models on a mean-rank axis, bars join models whose
    difference is not significant, the CD length drawn above the axis."""
    from adlib.figures import new_figure, save_figure

    ranks = ranks.sort_values()
    k = len(ranks)
    lo, hi = 1, max(k, 2)
    half = (k + 1) // 2
    height = 1.6 + 0.3 * max(half, k - half)
    fig, (ax,) = new_figure(7, height)
    ax.set_xlim(lo - 0.6, hi + 0.6)
    ax.set_ylim(-0.3 * (max(half, k - half) + 2), 1.2)
    ax.axis("off")
    ax.hlines(0, lo, hi, color="black", lw=1)
    for tick in range(lo, hi + 1):
        ax.vlines(tick, 0, 0.08, color="black", lw=1)
        ax.text(tick, 0.14, str(tick), ha="center", va="bottom", fontsize=9)
    if cd is not None:
        ax.hlines(0.75, lo, lo + cd, color="black", lw=1.5)
        ax.vlines([lo, lo + cd], 0.7, 0.8, color="black", lw=1.5)
        ax.text(lo + cd / 2, 0.85, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for i, (name, rank) in enumerate(ranks.items()):
        left = i < half
        level = -0.3 * ((i if left else k - 1 - i) + 1) - 0.2
        end = lo - 0.5 if left else hi + 0.5
        ax.plot([rank, rank, end], [0, level, level], color="black", lw=0.8)
        ax.text(end, level, f"{name} ({rank:.2f})" if left else f"({rank:.2f}) {name}",
                ha="right" if left else "left", va="center", fontsize=9)
    if cd is not None:
        for g, members in enumerate(not_different_groups(ranks, cd)):
            y = -0.1 - 0.07 * g
            ax.hlines(y, ranks[members[0]] - 0.03, ranks[members[-1]] + 0.03, color="tab:red", lw=3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=120, tight=False, bbox_inches="tight")


# ----------------------------------------------------------------------------------------------
# bootstrap
def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    confidence: float = 0.95, chunk: int = 256) -> dict[str, Any]:
    """AUROC and its stratified percentile bootstrap interval (classes resampled separately).

    Each resample keeps the numbers of normal and anomalous images, so every resample has both
    classes. AUROC is the Mann-Whitney statistic (ties count one half). Returns ``None`` values
    with a note when a class is missing.
    """
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    out: dict[str, Any] = {"auroc": None, "ci_low": None, "ci_high": None, "n_boot": int(n_boot),
                           "confidence": float(confidence), "note": None}
    if len(pos) == 0 or len(neg) == 0:
        out["note"] = "AUROC needs normal and anomalous test images"
        return out
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        stats.append(_auroc_rows(pos[rng.integers(0, len(pos), (b, len(pos)))],
                                 neg[rng.integers(0, len(neg), (b, len(neg)))]))
    low, high = percentile_interval(np.concatenate(stats), confidence)
    out.update(auroc=float(_auroc_rows(pos[None], neg[None])[0]), ci_low=low, ci_high=high)
    return out


def _auroc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties count one half) of every row: anomalous ``pos`` vs normal ``neg``."""
    from scipy.stats import rankdata

    both = np.concatenate([pos, neg], axis=1)
    ranks = rankdata(both, axis=1, method="average")[:, : pos.shape[1]]
    n1, n0 = pos.shape[1], neg.shape[1]
    return (ranks.sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap replicates (percentile method)."""
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def paired_bootstrap_auroc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                                      n_boot: int = 1000, seed: int = 0, chunk: int = 256) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same images, and its bootstrap replicates.

    Paired: each replicate resamples images (normals and anomalies separately, as
    :func:`bootstrap_auroc`) and scores both a and b on that same resample, so the interval
    reflects the difference, not the two AUROCs' own spread. Returns ``{"auroc_a", "auroc_b",
    "difference", "replicates"}`` (``None`` values and no replicates when a class is missing).
    """
    labels = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(pos) == 0 or len(neg) == 0:
        return {"auroc_a": None, "auroc_b": None, "difference": None, "replicates": np.empty(0)}
    rng = np.random.default_rng(seed)
    replicates = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        p = pos[rng.integers(0, len(pos), (size, len(pos)))]
        q = neg[rng.integers(0, len(neg), (size, len(neg)))]
        replicates.append(_auroc_rows(a[p], a[q]) - _auroc_rows(b[p], b[q]))
    auroc_a = float(_auroc_rows(a[pos][None], a[neg][None])[0])
    auroc_b = float(_auroc_rows(b[pos][None], b[neg][None])[0])
    return {"auroc_a": auroc_a, "auroc_b": auroc_b, "difference": auroc_a - auroc_b,
            "replicates": np.concatenate(replicates)}


def bootstrap_table(run_dirs: Iterable[str | os.PathLike], n_boot: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> pd.DataFrame:
    """One row per run: image AUROC on the test split and its bootstrap interval."""
    rows = []
    for run_dir in run_dirs:
        scores = read_scores(run_dir)
        test = scores[scores["split"] == "test"]
        result = bootstrap_auroc(test["label"].to_numpy(), test["score"].to_numpy(), n_boot, seed, confidence)
        rows.append({**{k: scores[k].iloc[0] if len(scores) else None for k in RUN_KEYS}, **result,
                     "n_test": int(len(test))})
    return pd.DataFrame(rows, columns=[*RUN_KEYS, "auroc", "ci_low", "ci_high", "n_boot", "confidence", "note",
                                       "n_test"])


# ----------------------------------------------------------------------------------------------
# one entry point for the workflow
def write_statistics(leaderboard: str | os.PathLike, run_dirs: Iterable[str | os.PathLike],
                     out_json: str | os.PathLike, out_png: str | os.PathLike, out_ci_csv: str | os.PathLike, *,
                     metric: str = "image_auroc", alpha: float = 0.05, n_boot: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Friedman test + Nemenyi CD (JSON and diagram) from the leaderboard, bootstrap CIs from scores."""
    board = pd.read_parquet(leaderboard)
    values = rank_matrix(category_ranks(board, metric), metric)
    result = {"metric": metric, "alpha": alpha, "friedman": friedman_test(values),
              "mean_ranks": {}, "critical_difference": None, "not_different_groups": [], "notes": []}
    left_out = sorted(set(board["model"]) - set(values.columns))
    if left_out:
        result["notes"].append(f"left out (no {metric} on the categories compared): {', '.join(left_out)}")
    k, n = values.shape[1], values.shape[0]
    ranks = mean_ranks(values) if n else pd.Series(dtype=float)
    result["mean_ranks"] = {str(m): float(r) for m, r in ranks.items()}
    cd = None
    if k >= 2 and n >= 1:
        cd = nemenyi_critical_difference(k, n, alpha)
        result["critical_difference"] = cd
        result["not_different_groups"] = not_different_groups(ranks, cd)
    else:
        result["notes"].append(f"the critical difference needs >= 2 models compared on >= 1 category "
                               f"(got {k} models, {n} complete categories)")
    p = result["friedman"]["p_value"]
    if p is not None and p >= alpha:
        result["notes"].append(f"Friedman p = {p:.3g} >= alpha = {alpha}: the models' ranks do not differ "
                               "significantly, so the Nemenyi groups are indicative only")
    write_json(out_json, result)
    plot_cd_diagram(ranks, cd, out_png, title=f"Mean rank by {metric} over {n} categories (Nemenyi, alpha={alpha})")
    write_table(bootstrap_table(run_dirs, n_boot, seed, confidence), out_ci_csv)
    return result
