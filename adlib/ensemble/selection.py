"""Choosing an ensemble on the fit split: candidate models, every subset x normalisation x
fusion, and the recommendation. Test-split numbers are computed beside them for the report,
never used to choose.

* candidates: the ``top_k`` models with the best mean rank over categories by the selection
  metric on the fit split;
* each combination is scored on the fit split: mean and max fusion by their fused fit-split
  scores, weighted fusion by cross-validated (out-of-fold) scores, so its fitted weights do not
  flatter it;
* the recommendation is the combination with the best mean over categories (seeds averaged
  first); ties go to fewer members, then to the simpler rule.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from adlib.ensemble.fitted import FittedEnsemble, fit_ensemble, normalized_matrix
from adlib.ensemble.fusion import FUSIONS, cross_validated_stacking, stacking_problem
from adlib.ensemble.normalization import NORMALIZATIONS
from adlib.ensemble.runs import BLOCK, Block
from adlib.evaluation.metrics import average_precision, image_auroc

SELECTION_METRICS: dict[str, Callable] = {"image_auroc": image_auroc, "image_aupr": average_precision}
COMBINATION = ["members", "size", "normalization", "fusion"]


def check_metric(metric: str) -> Callable:
    if metric not in SELECTION_METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; choose one of {', '.join(SELECTION_METRICS)} "
                         "(pixel metrics need masks of the calibration images and are not used to select)")
    return SELECTION_METRICS[metric]


def _test_metrics(block: Block, scores: np.ndarray) -> dict[str, Any]:
    return {"test_image_auroc": image_auroc(block.test.label, scores),
            "test_image_aupr": average_precision(block.test.label, scores)}


def single_rows(block: Block, metric: str) -> list[dict[str, Any]]:
    """Every model of the block alone: its fit-split metric and its test metrics."""
    score = check_metric(metric)
    return [{**block.key, "members": m, "size": 1, "normalization": "none", "fusion": "none",
             "fit_split": block.fit_split, f"fit_{metric}": score(block.fit.label, block.fit.raw[m]),
             **_test_metrics(block, block.test.raw[m])} for m in block.members]


def candidate_table(singles: pd.DataFrame, metric: str, top_k: int) -> pd.DataFrame:
    """Every model by mean rank over categories of its fit-split ``metric`` (1 = best)."""
    column = f"fit_{metric}"
    per_category = singles.groupby(["dataset", "category", "members"], sort=True)[column].mean().reset_index()
    per_category["rank"] = per_category.groupby(["dataset", "category"])[column].rank(ascending=False,
                                                                                      method="average")
    table = per_category.groupby("members").agg(mean_rank=("rank", "mean"), **{f"mean_{column}": (column, "mean")},
                                                n_categories=("rank", "size")).reset_index()
    table = table.rename(columns={"members": "model"}).sort_values(
        ["mean_rank", f"mean_{column}", "model"], ascending=[True, False, True]).reset_index(drop=True)
    table["position"] = np.arange(1, len(table) + 1)
    table["candidate"] = table["position"] <= top_k
    return table


def selection_scores(block: Block, ensemble: FittedEnsemble, seed: int = 0) -> np.ndarray | None:
    """The fit-split scores a combination is selected by (out-of-fold for weighted fusion)."""
    if ensemble.fusion != "weighted":
        return ensemble.fuse_scores(block.fit.raw)
    features = normalized_matrix(block.fit, ensemble.score_normalizers, ensemble.members)
    return cross_validated_stacking(features, block.fit.label, seed=seed)


def combination_rows(block: Block, candidates: Sequence[str], metric: str, *,
                     normalizations: Sequence[str] = NORMALIZATIONS, fusions: Sequence[str] = FUSIONS,
                     seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every subset (two or more candidates) x normalisation x fusion on one block, and the
    fitted weights of the weighted ones."""
    score = check_metric(metric)
    rows, weights = [], []
    present = [m for m in candidates if m in block.members]
    for size in range(2, len(present) + 1):
        for subset in itertools.combinations(present, size):
            for normalization in normalizations:
                for fusion in fusions:
                    if fusion == "weighted" and stacking_problem(block.fit.label):
                        continue
                    ensemble = fit_ensemble(block, subset, normalization, fusion)
                    selected = selection_scores(block, ensemble, seed)
                    rows.append({**block.key, "members": "+".join(subset), "size": size,
                                 "normalization": normalization, "fusion": fusion, "fit_split": block.fit_split,
                                 f"fit_{metric}": None if selected is None else score(block.fit.label, selected),
                                 **_test_metrics(block, ensemble.fuse_scores(block.test.raw))})
                    if ensemble.weights:
                        weights += [{**block.key, "members": "+".join(subset), "normalization": normalization,
                                     "model": m, "weight": w, "intercept": ensemble.intercept}
                                    for m, w in ensemble.weights.items()]
    return rows, weights


def summarize(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per combination: means over categories (seeds averaged first), best by the fit split first."""
    column = f"fit_{metric}"
    values = [column, "test_image_auroc", "test_image_aupr"]
    per_category = results.groupby(["dataset", "category", *COMBINATION], sort=False)[values].mean().reset_index()
    summary = per_category.groupby(COMBINATION, sort=False).agg(
        **{f"mean_{column}": (column, "mean"), f"std_{column}": (column, "std")},
        mean_test_image_auroc=("test_image_auroc", "mean"), mean_test_image_aupr=("test_image_aupr", "mean"),
        n_categories=(column, "count")).reset_index()
    return _ranked(summary, f"mean_{column}")


def _ranked(summary: pd.DataFrame, column: str) -> pd.DataFrame:
    """Best first: higher ``column``, then fewer members, then the simpler rule, then names."""
    order = summary.assign(
        _value=-summary[column].round(12).fillna(-np.inf),
        _fusion=summary["fusion"].map({f: i for i, f in enumerate(("none", *FUSIONS))}),
        _norm=summary["normalization"].map({n: i for i, n in enumerate(("none", *NORMALIZATIONS))}))
    order = order.sort_values(["_value", "size", "_fusion", "_norm", "members"], kind="stable")
    return order.drop(columns=["_value", "_fusion", "_norm"]).reset_index(drop=True)


def best_single_per_category(singles: pd.DataFrame, metric: str, order: Sequence[str]) -> dict[tuple, str]:
    """(dataset, category) -> the single model with the best fit-split metric there (seeds
    averaged; ties go to the better mean rank, ``order``)."""
    column = f"fit_{metric}"
    means = singles.groupby(["dataset", "category", "members"])[column].mean().reset_index()
    means["_position"] = means["members"].map({m: i for i, m in enumerate(order)})
    means = means.sort_values([column, "_position"], ascending=[False, True], na_position="last")
    return {key: group["members"].iloc[0] for key, group in means.groupby(["dataset", "category"], sort=True)}


def recommend(summary: pd.DataFrame, singles: pd.DataFrame, metric: str, best_single: dict[tuple, str]
              ) -> dict[str, Any]:
    """The best ensemble by the fit split, and whether it beats the best single model per category there."""
    column = f"fit_{metric}"
    ensembles = summary[(summary["size"] > 1) & summary[f"mean_{column}"].notna()]
    single_fit = singles.groupby(["dataset", "category", "members"])[column].mean()
    per_category = [single_fit.get((d, c, m)) for (d, c), m in best_single.items()]
    single_mean = float(np.nanmean([v for v in per_category if v is not None])) if per_category else None
    out: dict[str, Any] = {"metric": metric, "best_single_per_category": {f"{d}/{c}": m for (d, c), m in
                                                                        best_single.items()},
                           f"best_single_mean_fit_{metric}": single_mean}
    if ensembles.empty:
        return {**out, "members": None, "normalization": None, "fusion": None, "ensemble_helps_on_fit_split": False}
    top = ensembles.iloc[0]
    value = float(top[f"mean_{column}"])
    return {**out, "members": top["members"].split("+"), "normalization": top["normalization"],
            "fusion": top["fusion"], f"mean_fit_{metric}": value,
            "ensemble_helps_on_fit_split": bool(single_mean is None or value > single_mean + 1e-12)}


def block_keys(frame: pd.DataFrame) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """(block identity, its rows) of a long score frame, sorted."""
    return [(dict(zip(BLOCK, key)), group) for key, group in frame.groupby(list(BLOCK), sort=True)]
