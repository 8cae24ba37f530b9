"""Ensemble-candidate report: pick the best models by mean rank, measure how correlated their
per-image scores are, and evaluate score-level fusion of candidate subsets on every category.

Normalisation before fusion (each model's scores are put on a common scale):

* ``zscore``: (s - mean) / std of the model's scores on *reference normal images*;
* ``minmax``: (s - min) / (max - min) of the same reference normal scores;
* ``rank``: the score's rank among the evaluated images, divided by their number (needs no
  reference statistics and no labels).

Reference normal images never include the test labels when avoidable: they are the normal
images of the calibration split when the runs have one (``calibration: {method: calibration}``),
else the normal images of the test split. The second choice uses test labels and is optimistic;
every row says which one it used (``norm_source``), and the report warns about it.

Fusion: ``mean`` or ``max`` of the normalised scores. Ensembles are compared on image AUROC and
AUPR with the best single model (best mean rank) and with the best single model per category
(an oracle choice). Score fusion for anomaly detection follows common practice, e.g.
Zimek et al., "Ensembles for unsupervised outlier detection", SIGKDD Explorations 15(1), 2013.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from adlib.evaluation.metrics import average_precision, image_auroc
from adlib.io import write_text
from adlib.reporting.html import html_page, markdown_table, markdown_to_html_embedded
from adlib.reporting.leaderboard import category_ranks, write_table
from adlib.reporting.runs import read_all_scores

NORMALIZATIONS = ("zscore", "minmax", "rank")
FUSIONS = ("mean", "max")
BLOCK = ["dataset", "category", "seed"]
CALIBRATION_SOURCE = "calibration normals"
TEST_SOURCE = "test normals (optimistic: uses test labels)"


# ----------------------------------------------------------------------------------------------
# pieces
def select_candidates(leaderboard: pd.DataFrame, top_k: int, metric: str = "image_auroc") -> pd.DataFrame:
    """The ``top_k`` models with the best mean rank over categories (ties: higher mean metric)."""
    ranks = category_ranks(leaderboard, metric)
    table = ranks.groupby("model").agg(mean_rank=("rank", "mean"), **{f"mean_{metric}": (metric, "mean")},
                                       n_categories=("rank", "size")).reset_index()
    table = table.sort_values(["mean_rank", f"mean_{metric}", "model"], ascending=[True, False, True])
    table = table.reset_index(drop=True)
    table["position"] = np.arange(1, len(table) + 1)
    table["candidate"] = table["position"] <= top_k
    return table


def normalize(scores: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    """Put one model's scores on a common scale (see the module docstring)."""
    scores = np.asarray(scores, dtype=float)
    if method == "zscore":
        std = float(np.std(reference))
        return (scores - float(np.mean(reference))) / (std if std > 1e-12 else 1.0)
    if method == "minmax":
        low, high = float(np.min(reference)), float(np.max(reference))
        return (scores - low) / (high - low if high - low > 1e-12 else 1.0)
    if method == "rank":
        from scipy.stats import rankdata

        return rankdata(scores, method="average") / len(scores)
    raise ValueError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZATIONS)}")


def fuse(normalized: np.ndarray, method: str) -> np.ndarray:
    """Combine an images x models matrix of normalised scores into one score per image."""
    if method == "mean":
        return normalized.mean(axis=1)
    if method == "max":
        return normalized.max(axis=1)
    raise ValueError(f"unknown fusion {method!r}; choose one of {', '.join(FUSIONS)}")


def block_matrix(scores: pd.DataFrame, models: Sequence[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray], str]:
    """For one dataset/category/seed: test images x models scores (+ label), the reference normal
    scores of each model and which reference was used."""
    test = scores[scores["split"] == "test"]
    wide = test.pivot_table(index="image_path", columns="model", values="score", aggfunc="first")
    labels = test.groupby("image_path")["label"].first()
    wide = wide.reindex(columns=list(models)).dropna(axis=0, how="any")
    wide["label"] = labels.reindex(wide.index).astype(int)
    calib = scores[(scores["split"] == "calibration") & (scores["label"] == 0)]
    if all((calib["model"] == m).any() for m in models):
        ref = {m: calib.loc[calib["model"] == m, "score"].to_numpy(float) for m in models}
        return wide, ref, CALIBRATION_SOURCE
    normals = wide[wide["label"] == 0]
    return wide, {m: normals[m].to_numpy(float) for m in models}, TEST_SOURCE


def evaluate_block(wide: pd.DataFrame, reference: dict[str, np.ndarray], candidates: Sequence[str],
                   normalizations: Sequence[str], fusions: Sequence[str]) -> list[dict[str, Any]]:
    """Single models and every subset (size >= 2) x normalisation x fusion on one block."""
    labels = wide["label"].to_numpy()
    rows = [{"members": m, "size": 1, "normalization": "none", "fusion": "none",
             "image_auroc": image_auroc(labels, wide[m].to_numpy(float)),
             "image_aupr": average_precision(labels, wide[m].to_numpy(float))} for m in candidates]
    if len(wide) == 0:
        return rows
    normed = {(m, n): normalize(wide[m].to_numpy(float), reference[m], n)
              for m in candidates for n in normalizations if n == "rank" or len(reference[m])}
    for size in range(2, len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            for norm in normalizations:
                if any((m, norm) not in normed for m in subset):
                    continue
                matrix = np.stack([normed[(m, norm)] for m in subset], axis=1)
                for how in fusions:
                    fused = fuse(matrix, how)
                    rows.append({"members": "+".join(subset), "size": size, "normalization": norm, "fusion": how,
                                 "image_auroc": image_auroc(labels, fused),
                                 "image_aupr": average_precision(labels, fused)})
    return rows


def fusion_results(scores: pd.DataFrame, candidates: Sequence[str], normalizations: Sequence[str] = NORMALIZATIONS,
                   fusions: Sequence[str] = FUSIONS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fusion rows for every dataset/category/seed, and per-block Spearman correlations of candidates."""
    scores = scores[scores["model"].isin(candidates)]
    rows, corr_rows = [], []
    for key, group in scores.groupby(BLOCK, sort=True):
        present = [m for m in candidates if (group["model"] == m).any()]
        if len(present) < 1:
            continue
        wide, reference, source = block_matrix(group, present)
        ident = dict(zip(BLOCK, key))
        for row in evaluate_block(wide, reference, present, normalizations, fusions):
            rows.append({**ident, **row, "norm_source": source if row["size"] > 1 else "",
                         "n_images": int(len(wide))})
        corr = wide[present].corr(method="spearman") if len(present) > 1 else None
        for a, b in itertools.combinations(present, 2):
            corr_rows.append({**ident, "model_a": a, "model_b": b, "spearman": float(corr.loc[a, b])})
    columns = [*BLOCK, "members", "size", "normalization", "fusion", "image_auroc", "image_aupr", "norm_source",
               "n_images"]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(corr_rows, columns=[*BLOCK, "model_a", "model_b",
                                                                                  "spearman"])


def correlation_summary(corr: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max Spearman correlation of each candidate pair over categories and seeds."""
    if corr.empty:
        return pd.DataFrame(columns=["model_a", "model_b", "mean_spearman", "min_spearman", "max_spearman",
                                     "n_blocks"])
    return corr.groupby(["model_a", "model_b"], sort=False).agg(
        mean_spearman=("spearman", "mean"), min_spearman=("spearman", "min"), max_spearman=("spearman", "max"),
        n_blocks=("spearman", "size")).reset_index()


def summarize_fusion(results: pd.DataFrame, best_single: str) -> pd.DataFrame:
    """Per combination: mean/std AUROC over categories (seeds averaged first), gains and wins vs singles."""
    per_cat = results.groupby(["dataset", "category", "members", "size", "normalization", "fusion"],
                              sort=False)[["image_auroc", "image_aupr"]].mean().reset_index()
    singles = per_cat[per_cat["size"] == 1]
    best = singles[singles["members"] == best_single].set_index(["dataset", "category"])["image_auroc"]
    oracle = singles.groupby(["dataset", "category"])["image_auroc"].max()
    per_cat = per_cat.join(best.rename("best_single_auroc"), on=["dataset", "category"])
    per_cat = per_cat.join(oracle.rename("oracle_single_auroc"), on=["dataset", "category"])
    per_cat["gain"] = per_cat["image_auroc"] - per_cat["best_single_auroc"]
    per_cat["oracle_gain"] = per_cat["image_auroc"] - per_cat["oracle_single_auroc"]
    summary = per_cat.groupby(["members", "size", "normalization", "fusion"], sort=False).agg(
        mean_auroc=("image_auroc", "mean"), std_auroc=("image_auroc", "std"), mean_aupr=("image_aupr", "mean"),
        n_categories=("image_auroc", "count"), gain_vs_best_single=("gain", "mean"),
        gain_vs_oracle_single=("oracle_gain", "mean"), wins_vs_best_single=("gain", lambda g: int((g > 1e-12).sum())),
    ).reset_index()
    summary = summary.sort_values(["mean_auroc", "size", "members"], ascending=[False, True, True],
                                  na_position="last").reset_index(drop=True)
    summary["recommended"] = False
    return summary


def recommend(summary: pd.DataFrame, best_single: str) -> dict[str, Any]:
    """The best ensemble by mean AUROC, and whether it beats the best single model."""
    ensembles = summary[(summary["size"] > 1) & summary["mean_auroc"].notna()]
    single = summary[(summary["size"] == 1) & (summary["members"] == best_single)]
    single_auroc = float(single["mean_auroc"].iloc[0]) if len(single) else None
    if ensembles.empty:
        return {"members": best_single, "normalization": "none", "fusion": "none", "mean_auroc": single_auroc,
                "best_single": best_single, "best_single_auroc": single_auroc, "ensemble_helps": False}
    top = ensembles.iloc[0]
    helps = single_auroc is None or float(top["mean_auroc"]) > single_auroc + 1e-12
    return {"members": top["members"] if helps else best_single,
            "normalization": top["normalization"] if helps else "none",
            "fusion": top["fusion"] if helps else "none",
            "mean_auroc": float(top["mean_auroc"]) if helps else single_auroc,
            "best_ensemble": top["members"], "best_ensemble_normalization": top["normalization"],
            "best_ensemble_fusion": top["fusion"], "best_ensemble_auroc": float(top["mean_auroc"]),
            "best_single": best_single, "best_single_auroc": single_auroc, "ensemble_helps": bool(helps)}


def plot_correlation(corr: pd.DataFrame, candidates: Sequence[str], path: str | os.PathLike) -> Path:
    """Heat map of the mean Spearman correlation between candidates' per-image scores."""
    from adlib.figures import new_figure, save_figure

    n = len(candidates)
    matrix = np.eye(n)
    index = {m: i for i, m in enumerate(candidates)}
    for _, row in corr.iterrows():
        i, j = index[row["model_a"]], index[row["model_b"]]
        matrix[i, j] = matrix[j, i] = row["mean_spearman"]
    fig, (ax,) = new_figure(1.2 * n + 2.5, 1.0 * n + 1.5)
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(n), candidates, rotation=30, ha="right")
    ax.set_yticks(range(n), candidates)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean Spearman correlation of test scores")
    ax.set_title("Score correlation between candidates", fontsize=10)
    return save_figure(fig, path, dpi=120)


def ensemble_markdown(candidates: pd.DataFrame, corr: pd.DataFrame, summary: pd.DataFrame, rec: dict[str, Any],
                      results: pd.DataFrame, metric: str, top_k: int, correlation_png: str | None = None) -> str:
    """The readable report (Markdown)."""
    chosen = candidates[candidates["candidate"]]
    parts = ["# Ensemble candidates", "",
             f"Candidates: the {len(chosen)} models with the best mean rank by `{metric}` over categories "
             f"(top_k = {top_k}).", "",
             markdown_table(candidates, ["position", "model", "mean_rank", f"mean_{metric}", "n_categories",
                                         "candidate"], digits=3)]
    if len(chosen) < 2:
        parts += ["Fewer than two models have results, so there is nothing to fuse.", ""]
        return "\n".join(parts)
    parts += ["## How correlated are their per-image scores", "",
              "Spearman correlation of test-image scores, averaged over categories and seeds. Low correlation "
              "means the models make different mistakes, which is what fusion can exploit.", "",
              markdown_table(corr, digits=3)]
    if correlation_png:
        parts += [f"![score correlation]({correlation_png})", ""]
    sources = sorted(set(results.loc[results["size"] > 1, "norm_source"]) - {""})
    parts += ["## Recommendation", ""]
    if rec.get("ensemble_helps"):
        parts.append(f"**Recommended: {rec['members']}** with {rec['normalization']} normalisation and "
                     f"{rec['fusion']} fusion: mean image AUROC {rec['mean_auroc']:.4f} against "
                     f"{rec['best_single_auroc']:.4f} for the best single model ({rec['best_single']}).")
    else:
        best = (f" The best ensemble ({rec['best_ensemble']}, {rec['best_ensemble_normalization']}, "
                f"{rec['best_ensemble_fusion']}) reaches {rec['best_ensemble_auroc']:.4f}."
                if rec.get("best_ensemble") else "")
        parts.append(f"**Recommended: the single model {rec['best_single']}** (mean image AUROC "
                     f"{rec['best_single_auroc'] if rec['best_single_auroc'] is None else round(rec['best_single_auroc'], 4)}): "
                     f"no fused combination beats it.{best}")
    parts.append("")
    if TEST_SOURCE in sources:
        parts += ["_Warning_: these runs have no calibration split, so z-score and min-max normalisation used "
                  "the normal images of the test split (the test labels). Their ensemble numbers are "
                  "optimistic; set `calibration: {method: calibration}` for a clean estimate. Rank "
                  "normalisation is unaffected.", ""]
    else:
        parts += [f"Normalisation statistics: {', '.join(sources) or 'n/a'}.", ""]
    parts += ["## Ensembles vs single models (mean over categories; seeds averaged first)", "",
              "`gain_vs_best_single`: mean AUROC difference to the best single model by mean rank; "
              "`gain_vs_oracle_single`: to the best single model of each category (an oracle); "
              "`wins_vs_best_single`: categories where the ensemble is better.", "",
              markdown_table(summary.head(30), ["members", "size", "normalization", "fusion", "mean_auroc",
                                                "std_auroc", "mean_aupr", "gain_vs_best_single",
                                                "gain_vs_oracle_single", "wins_vs_best_single", "n_categories",
                                                "recommended"], digits=4)]
    if len(summary) > 30:
        parts += [f"({len(summary) - 30} more rows in fusion_summary.csv)", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# one entry point for the workflow
def write_ensemble_report(leaderboard: str | os.PathLike, run_dirs: Iterable[str | os.PathLike],
                          out_dir: str | os.PathLike, *, top_k: int = 3, normalizations: Sequence[str] = NORMALIZATIONS,
                          fusions: Sequence[str] = FUSIONS, metric: str = "image_auroc") -> dict[str, Any]:
    """Write candidates.csv, correlation.csv/png, fusion_results.csv, fusion_summary.csv,
    ensemble.md and ensemble.html into ``out_dir``; return the recommendation."""
    for name in normalizations:
        if name not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {name!r}; choose from {', '.join(NORMALIZATIONS)}")
    for name in fusions:
        if name not in FUSIONS:
            raise ValueError(f"unknown fusion {name!r}; choose from {', '.join(FUSIONS)}")
    out = Path(out_dir)
    board = pd.read_parquet(leaderboard)
    candidates = select_candidates(board, top_k, metric)
    chosen = candidates.loc[candidates["candidate"], "model"].tolist()
    scores = read_all_scores([d for d in run_dirs if Path(d).parts[-2] in set(chosen)])
    results, corr_blocks = fusion_results(scores, chosen, normalizations, fusions)
    corr = correlation_summary(corr_blocks)
    best_single = chosen[0] if chosen else ""
    summary = summarize_fusion(results, best_single) if not results.empty else pd.DataFrame(
        columns=["members", "size", "normalization", "fusion", "mean_auroc", "recommended"])
    rec = recommend(summary, best_single) if chosen else {"members": None, "ensemble_helps": False}
    if len(summary):
        summary["recommended"] = ((summary["members"] == rec["members"])
                                  & (summary["normalization"] == rec["normalization"])
                                  & (summary["fusion"] == rec["fusion"]))
    write_table(candidates, out / "candidates.csv")
    write_table(corr, out / "correlation.csv")
    write_table(results, out / "fusion_results.csv")
    write_table(summary, out / "fusion_summary.csv")
    plot_correlation(corr, chosen, out / "correlation.png")
    text = ensemble_markdown(candidates, corr, summary, rec, results, metric, top_k, "correlation.png")
    write_text(out / "ensemble.md", text)
    write_text(out / "ensemble.html", html_page("adlib ensemble candidates", markdown_to_html_embedded(text, out)))
    return rec
