"""How differently candidate models score the same images, on the fit split: Spearman
correlation of their scores, and how often a pair fails on the same images.

A model *fails* on an image when its decision at its own F1 threshold (``f1_percentile``,
fitted on the same images; the 95th normal percentile when that cannot be fitted) is wrong.
``failure_overlap`` is the Jaccard index of two models' failure sets (1: they fail on exactly
the same images, 0: never together); ``joint_failure_rate`` is the share of images both fail
on (the "double fault" of Giacinto and Roli, "Design of effective neural network ensembles for
image classification purposes", Image and Vision Computing 19(9), 2001). Low correlation and
low overlap are what fusion can exploit.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from adlib.ensemble.runs import Block
from adlib.evaluation.thresholds import fit_threshold

PAIR_COLUMNS = ["model_a", "model_b", "mean_spearman", "min_spearman", "max_spearman", "mean_failure_overlap",
                "mean_joint_failure_rate", "n_blocks"]


def failures(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Images a model decides wrongly at its own F1 threshold on these images."""
    fitted = fit_threshold("f1_percentile", labels, scores)
    if fitted.threshold is None:
        fitted = fit_threshold("percentile_95", labels, scores)
    if fitted.threshold is None:
        return np.zeros(len(labels), dtype=bool)
    return (scores >= fitted.threshold) != (labels == 1)


def diversity_rows(block: Block, candidates: Sequence[str]) -> list[dict[str, Any]]:
    """Per candidate pair on the block's fit split: correlation, failure overlap, joint failures."""
    from scipy.stats import spearmanr

    fit = block.fit
    present = [m for m in candidates if m in block.members]
    failed = {m: failures(fit.label, fit.raw[m]) for m in present}
    rows = []
    for a, b in itertools.combinations(present, 2):
        both, either = failed[a] & failed[b], failed[a] | failed[b]
        rho = spearmanr(fit.raw[a], fit.raw[b]).statistic if len(fit) > 2 else np.nan
        rows.append({**block.key, "split": block.fit_split, "model_a": a, "model_b": b, "spearman": float(rho),
                     "failures_a": int(failed[a].sum()), "failures_b": int(failed[b].sum()),
                     "joint_failures": int(both.sum()),
                     "failure_overlap": float(both.sum() / either.sum()) if either.any() else 0.0,
                     "joint_failure_rate": float(both.mean()) if len(fit) else np.nan})
    return rows


def diversity_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per pair, over blocks: mean/min/max Spearman, mean failure overlap and joint failure rate."""
    if rows.empty:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return rows.groupby(["model_a", "model_b"], sort=False).agg(
        mean_spearman=("spearman", "mean"), min_spearman=("spearman", "min"), max_spearman=("spearman", "max"),
        mean_failure_overlap=("failure_overlap", "mean"), mean_joint_failure_rate=("joint_failure_rate", "mean"),
        n_blocks=("spearman", "size")).reset_index()


def plot_diversity(summary: pd.DataFrame, candidates: Sequence[str], path: str | os.PathLike) -> Path:
    """Two heat maps: mean Spearman correlation and mean failure overlap of candidate pairs."""
    from adlib.figures import new_figure, save_figure

    n = len(candidates)
    index = {m: i for i, m in enumerate(candidates)}
    fig, axes = new_figure(2 * (1.1 * n + 2.5), 1.0 * n + 1.6, ncols=2)
    panels = (("mean_spearman", "Spearman correlation of scores", "coolwarm", (-1, 1)),
              ("mean_failure_overlap", "failure overlap (Jaccard)", "Reds", (0, 1)))
    for ax, (column, title, cmap, (low, high)) in zip(axes, panels):
        matrix = np.eye(n) if column == "mean_spearman" else np.ones((n, n))
        for _, row in summary.iterrows():
            i, j = index[row["model_a"]], index[row["model_b"]]
            matrix[i, j] = matrix[j, i] = row[column]
        image = ax.imshow(matrix, vmin=low, vmax=high, cmap=cmap)
        ax.set_xticks(range(n), candidates, rotation=30, ha="right")
        ax.set_yticks(range(n), candidates)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if abs(matrix[i, j]) > 0.75 else "black")  # readable on dark cells
        fig.colorbar(image, ax=ax)
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=120)
