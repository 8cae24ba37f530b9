"""The ensemble report (workflow rule ``ensemble``): from a benchmark's runs to a recommended
ensemble chosen on the calibration split, then measured once on the test split against the
best single model of each category.

Per data set x category x seed (a *block*, see :mod:`adlib.ensemble.runs`) everything that is
chosen or fitted uses the fit split only: candidates, the subset, normalisation statistics,
fusion weights, thresholds, and the single model it is compared with. The test split is used to
report: image AUROC/AUPR of every combination, pixel metrics of the fused maps (overall and per
defect type), and the paired bootstrap interval of the recommended ensemble's AUROC minus the
best single model's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from adlib.ensemble.diversity import diversity_rows, diversity_summary, plot_diversity
from adlib.ensemble.fitted import FittedEnsemble, fit_ensemble, fit_maps, resize_maps
from adlib.ensemble.fusion import FUSIONS, check_fusion, stacking_problem
from adlib.ensemble.normalization import NORMALIZATIONS, check_normalization
from adlib.ensemble.pixels import metrics_by_defect_type, pixel_metrics, read_masks
from adlib.ensemble.runs import (BLOCK, CALIBRATION, REFERENCES, TEST, Block, MemberRun, make_block, member_maps)
from adlib.ensemble.selection import (best_single_per_category, candidate_table, check_metric, combination_rows,
                                      recommend, single_rows, summarize)
from adlib.evaluation.metrics import average_precision, image_auroc
from adlib.io import write_json, write_text
from adlib.reporting.html import html_page, markdown_table, markdown_to_html_embedded
from adlib.reporting.leaderboard import write_table
from adlib.reporting.runs import run_identity
from adlib.reporting.stats import paired_bootstrap_auroc_difference, percentile_interval

#: files of the report, in ``out_dir``
OUTPUTS = ("candidates.csv", "diversity.csv", "diversity.png", "fusion_results.csv", "fusion_summary.csv",
           "weights.csv", "map_metrics.csv", "comparison.csv", "recommended_scores.parquet", "recommendation.json",
           "ensemble.md", "ensemble.html")


# ----------------------------------------------------------------------------------------------
# reading
def read_runs(run_dirs: Iterable[str | os.PathLike]) -> tuple[pd.DataFrame, dict[tuple, MemberRun]]:
    """Every run's scores in one long frame (identity from the run folder), and the runs by
    (dataset, category, model, seed)."""
    runs, frames = {}, []
    for run_dir in run_dirs:
        ident = run_identity(run_dir)
        run = MemberRun.read(run_dir, label=ident["model"])
        frames.append(run.scores.assign(dataset=ident["dataset"], category=ident["category"], seed=ident["seed"]))
        runs[(ident["dataset"], ident["category"], ident["model"], ident["seed"])] = run
    if not frames:
        raise ValueError("the ensemble report needs at least one evaluated run")
    return pd.concat(frames, ignore_index=True), runs


def read_manifests(paths: Iterable[str | os.PathLike]) -> dict[tuple[str, str], pd.DataFrame]:
    """(dataset, category) -> its manifest rows (mask paths for the pixel metrics)."""
    from adlib.data import load_manifest

    found: dict[tuple[str, str], pd.DataFrame] = {}
    for path in paths:
        frame = load_manifest(Path(path))
        for key, group in frame.groupby(["dataset", "category"], sort=False):
            found.setdefault(tuple(map(str, key)), group)
    return found


def blocks_of(frame: pd.DataFrame) -> list[Block]:
    """One block per data set x category x seed over every model scored there."""
    blocks = []
    for key, group in frame.groupby(list(BLOCK), sort=True):
        members = sorted(group["model"].unique())
        blocks.append(make_block(group, members, dict(zip(BLOCK, key))))
    return blocks


# ----------------------------------------------------------------------------------------------
# the recommended ensemble on one block
def _map_entry(block: Block, entry: str, members: str, normalization: str, fusion: str,
               rows: list[dict[str, Any]], map_size) -> list[dict[str, Any]]:
    return [{**block.key, "entry": entry, "members": members, "normalization": normalization, "fusion": fusion,
             "map_size": "x".join(map(str, map_size)) if map_size else "", **row} for row in rows]


class BlockEvaluation:
    """The recommended ensemble fitted on one block and measured on its test split."""

    def __init__(self, block: Block, runs: Mapping[str, MemberRun], members: Sequence[str], normalization: str,
                 fusion: str, best_single: str, manifest: pd.DataFrame | None):
        self.block, self.best_single = block, best_single
        self.maps = {m: mm for m in block.members if (mm := member_maps(runs[m], block)) is not None}
        self.ensemble = self.fit(members, normalization, fusion)
        self.scores = self.ensemble.fuse_scores(block.test.raw)
        self.masks = None
        if self.ensemble.map_members and manifest is not None:
            view = self.maps[self.ensemble.map_members[0]].view
            self.masks = read_masks(manifest, block.test.image_path, self.ensemble.map_size, view)

    def fit(self, members: Sequence[str], normalization: str, fusion: str, fused_reference: bool = True
            ) -> FittedEnsemble:
        ensemble = fit_ensemble(self.block, members, normalization, fusion)
        fit_maps(ensemble, {m: self.maps[m] for m in members if m in self.maps}, fused_reference)
        return ensemble

    def map_rows(self, normalizations: Sequence[str], fusions: Sequence[str]) -> list[dict[str, Any]]:
        """Pixel metrics: the recommended ensemble and each single model per defect type, every
        other rule over the same members overall."""
        if self.masks is None:
            return []
        block, ens, labels = self.block, self.ensemble, self.block.test.label
        rows = _map_entry(block, "ensemble", "+".join(ens.members), ens.normalization, ens.fusion,
                          metrics_by_defect_type(ens.fuse_maps({m: self.maps[m].test for m in ens.map_members}),
                                                 self.masks, labels, self.scores, block.test.defect_type),
                          ens.map_size)
        for model, maps in self.maps.items():
            if maps.view != self.maps[ens.map_members[0]].view:
                continue
            single = resize_maps(maps.test.astype(np.float32), ens.map_size)
            rows += _map_entry(block, "single", model, "none", "none",
                               metrics_by_defect_type(single, self.masks, labels, block.test.raw[model],
                                                      block.test.defect_type), ens.map_size)
        for normalization in normalizations:
            for fusion in fusions:
                if (normalization, fusion) == (ens.normalization, ens.fusion) or (
                        fusion == "weighted" and stacking_problem(block.fit.label)):
                    continue
                other = self.fit(ens.members, normalization, fusion, fused_reference=False)
                if not other.map_members:
                    continue
                fused = other.fuse_maps({m: self.maps[m].test for m in other.map_members})
                rows += _map_entry(block, "rule", "+".join(other.members), normalization, fusion,
                                   [{"defect_type": "all", **pixel_metrics(fused, self.masks),
                                     "image_auroc": None, "n_images": len(fused)}], other.map_size)
        return rows

    def comparison(self, n_boot: int, seed: int) -> tuple[dict[str, Any], np.ndarray]:
        """Ensemble vs best single model on the test split, paired bootstrap of the AUROC difference."""
        block, labels = self.block, self.block.test.label
        single_scores = block.test.raw[self.best_single]
        paired = paired_bootstrap_auroc_difference(labels, self.scores, single_scores, n_boot, seed)
        oracle = max(block.members, key=lambda m: image_auroc(labels, block.test.raw[m]) or -1.0)
        row = {**block.key, "fit_split": block.fit_split, "ensemble": "+".join(self.ensemble.members),
               "normalization": self.ensemble.normalization, "fusion": self.ensemble.fusion,
               "best_single": self.best_single, "ensemble_auroc": paired["auroc_a"],
               "best_single_auroc": paired["auroc_b"], "difference": paired["difference"],
               "ensemble_aupr": average_precision(labels, self.scores),
               "best_single_aupr": average_precision(labels, single_scores),
               "oracle_single": oracle, "oracle_single_auroc": image_auroc(labels, block.test.raw[oracle]),
               "n_test": int(len(labels))}
        return row, paired["replicates"]

    def scores_frame(self) -> pd.DataFrame:
        """The recommended ensemble's and the best single model's scores of every image."""
        frames = []
        splits = [(TEST, self.block.test)] + ([(CALIBRATION, self.block.fit)]
                                              if self.block.fit_split == CALIBRATION else [])
        for split, part in splits:
            frames.append(pd.DataFrame({
                **self.block.key, "image_path": part.image_path, "split": split,
                "label": part.label, "defect_type": part.defect_type,
                "ensemble_score": self.ensemble.fuse_scores(part.raw), "best_single": self.best_single,
                "best_single_score": part.raw[self.best_single]}))
        return pd.concat(frames, ignore_index=True)


PIXEL_COLUMNS = ("ensemble_pixel_auroc", "ensemble_pixel_aupro", "best_single_pixel_auroc",
                 "best_single_pixel_aupro")


def pixel_columns(map_rows: list[dict[str, Any]], best_single: str) -> dict[str, Any]:
    """Pixel AUROC/AUPRO over all test images of the ensemble and of the best single model (``None``
    without maps)."""
    out: dict[str, Any] = dict.fromkeys(PIXEL_COLUMNS)
    for row in map_rows:
        if row["defect_type"] != "all":
            continue
        who = "ensemble" if row["entry"] == "ensemble" else "best_single" if (
            row["entry"] == "single" and row["members"] == best_single) else None
        if who:
            out[f"{who}_pixel_auroc"], out[f"{who}_pixel_aupro"] = row["pixel_auroc"], row["pixel_aupro"]
    return out


def pooled_comparison(rows: list[dict[str, Any]], replicates: list[np.ndarray], confidence: float) -> dict[str, Any]:
    """Mean over blocks of the per-block differences; its interval from the blocks' replicates
    averaged replicate by replicate (blocks resampled independently)."""
    usable = [r for r in replicates if len(r)]
    row = {"dataset": "all", "category": "mean over blocks", "seed": "", "n_test": sum(r["n_test"] for r in rows)}
    for key in ("ensemble_auroc", "best_single_auroc", "difference", "ensemble_aupr", "best_single_aupr",
                "oracle_single_auroc", *PIXEL_COLUMNS):
        values = [r[key] for r in rows if r.get(key) is not None]
        row[key] = float(np.mean(values)) if values else None
    if usable and len(usable) == len(rows):
        row["ci_low"], row["ci_high"] = percentile_interval(np.mean(np.stack(usable), axis=0), confidence)
    return row


# ----------------------------------------------------------------------------------------------
# the entry point
def write_ensemble_report(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
                          manifests: Iterable[str | os.PathLike] = (), top_k: int = 3,
                          normalizations: Sequence[str] = NORMALIZATIONS, fusions: Sequence[str] = FUSIONS,
                          metric: str = "image_auroc", n_boot: int = 1000, confidence: float = 0.95,
                          seed: int = 0) -> dict[str, Any]:
    """Write the report files (:data:`OUTPUTS`) into ``out_dir``; return the recommendation.

    ``manifests``: the prepared manifests of the categories (their masks give the pixel metrics
    of the fused maps; without them only image metrics are reported).
    """
    for name in normalizations:
        check_normalization(name)
    for name in fusions:
        check_fusion(name)
    check_metric(metric)
    out = Path(out_dir)
    frame, runs = read_runs(run_dirs)
    masks_from = read_manifests(manifests)
    blocks = blocks_of(frame)

    singles = pd.DataFrame([row for block in blocks for row in single_rows(block, metric)])
    candidates = candidate_table(singles, metric, top_k)
    chosen = candidates.loc[candidates["candidate"], "model"].tolist()
    combos, weights, pairs = [], [], []
    for block in blocks:
        rows, fitted_weights = combination_rows(block, chosen, metric, normalizations=normalizations,
                                                fusions=fusions, seed=seed)
        combos += rows
        weights += fitted_weights
        pairs += diversity_rows(block, chosen)
    results = pd.concat([singles, pd.DataFrame(combos)], ignore_index=True)
    summary = summarize(results, metric)
    best_single = best_single_per_category(singles, metric, candidates["model"].tolist())
    rec = recommend(summary, singles, metric, best_single)
    rec.update(normalizations=list(normalizations), fusions=list(fusions), top_k=top_k,
               fit_splits={block.name(): block.fit_split for block in blocks})
    summary["recommended"] = (summary["members"] == "+".join(rec["members"] or [])) & (
        summary["normalization"] == rec["normalization"]) & (summary["fusion"] == rec["fusion"])

    comparison, replicates, map_rows, scores = [], [], [], []
    for block in blocks:
        if rec["members"] is None or not set(rec["members"]) <= set(block.members):
            continue
        key = (block.key["dataset"], block.key["category"])
        evaluation = BlockEvaluation(block, {m: runs[(*key, m, block.key["seed"])] for m in block.members},
                                     rec["members"], rec["normalization"], rec["fusion"], best_single[key],
                                     masks_from.get(tuple(map(str, key))))
        row, reps = evaluation.comparison(n_boot, seed)
        if len(reps):
            row["ci_low"], row["ci_high"] = percentile_interval(reps, confidence)
        block_maps = evaluation.map_rows(normalizations, fusions)
        row.update(pixel_columns(block_maps, best_single[key]))
        comparison.append(row)
        replicates.append(reps)
        map_rows += block_maps
        scores.append(evaluation.scores_frame())
        rec.setdefault("notes", []).extend(f"{block.name()}: {n}" for n in evaluation.ensemble.notes
                                           if n.startswith("maps:"))
    if comparison:
        comparison.append(pooled_comparison(comparison, replicates, confidence))
    comparison_table = pd.DataFrame(comparison)
    map_table = pd.DataFrame(map_rows)
    diversity = diversity_summary(pd.DataFrame(pairs))

    write_table(candidates, out / "candidates.csv")
    write_table(diversity, out / "diversity.csv")
    plot_diversity(diversity, chosen, out / "diversity.png")
    write_table(results, out / "fusion_results.csv")
    write_table(summary, out / "fusion_summary.csv")
    write_table(pd.DataFrame(weights, columns=[*BLOCK, "members", "normalization", "model", "weight", "intercept"]),
                out / "weights.csv")
    write_table(map_table, out / "map_metrics.csv")
    write_table(comparison_table, out / "comparison.csv")
    write_table(pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(),
                out / "recommended_scores.parquet")
    write_json(out / "recommendation.json", rec)
    text = ensemble_markdown(candidates, diversity, summary, pd.DataFrame(weights), rec, comparison_table, map_table,
                             blocks, metric, top_k, confidence, n_boot, runs)
    write_text(out / "ensemble.md", text)
    write_text(out / "ensemble.html", html_page("adlib ensemble report", markdown_to_html_embedded(text, out)))
    return rec


# ----------------------------------------------------------------------------------------------
# the readable report
def _selection_text(blocks: Sequence[Block]) -> list[str]:
    optimistic = [b.name() for b in blocks if b.optimistic]
    if not optimistic:
        return [f"Everything chosen here (candidates, the subset, normalisation statistics, fusion weights, "
                f"thresholds, and the single model it is compared with) was chosen on the **calibration split** "
                f"of each of the {len(blocks)} blocks (data set / category / seed); the test split is used once, "
                "to report.", ""]
    return [f"**Warning: selection is optimistic.** {len(optimistic)} of {len(blocks)} blocks have no calibration "
            f"split with normal and anomalous images ({', '.join(optimistic[:10])}"
            f"{' ...' if len(optimistic) > 10 else ''}), so there the candidates, subset, normalisation statistics, "
            "weights and thresholds were chosen on the **test split** and its labels, and the test numbers below "
            "overstate what a deployment would see. Set `calibration: {method: calibration, fraction: 0.2}` in the "
            "config for a clean estimate.", ""]


def _recommendation_text(rec: Mapping[str, Any], metric: str, runs: Mapping[tuple, MemberRun]) -> list[str]:
    if rec["members"] is None:
        return ["Fewer than two candidate models have results on the same images, so there is nothing to fuse.", ""]
    value = rec.get(f"mean_fit_{metric}")
    single = rec.get(f"best_single_mean_fit_{metric}")
    parts = [f"**Recommended ensemble: {' + '.join(rec['members'])}**, {rec['normalization']} normalisation, "
             f"{rec['fusion']} fusion: mean fit-split {metric} {value:.4f}, against {single:.4f} for the best single "
             "model of each category (chosen the same way)."]
    if not rec["ensemble_helps_on_fit_split"]:
        parts.append("On the fit split it does **not** beat the best single model: unless the test comparison below "
                     "shows a real gain, deploy that model alone (`adlib predict RUN_DIR`).")
    image_only = sorted({r.label for r in runs.values() if r.label in rec["members"] and not r.produces_maps})
    if len(image_only) == len(rec["members"]):
        parts.append("No member produces anomaly maps: the ensemble scores whole images only.")
    elif image_only:
        parts.append(f"{', '.join(image_only)} score{'s' if len(image_only) == 1 else ''} whole images only (no "
                     "anomaly maps): image-level fusion only; the fused maps come from the other members.")
    parts.append("The deployable ensemble per block is written by `adlib ensemble build` (the workflow's "
                 "`ensemble_artifacts` rule: `results/ensemble/artifacts/<dataset>/<category>/<seed>/`); "
                 "`adlib predict ENSEMBLE_DIR images/` scores new images with it.")
    return [" ".join(parts), ""]


def _weights_text(weights: pd.DataFrame, rec: Mapping[str, Any], chosen: Sequence[str]) -> list[str]:
    if weights.empty:
        return []
    full = weights[weights["members"] == "+".join(chosen)]
    table = full.groupby(["normalization", "model"], sort=False).agg(mean_weight=("weight", "mean"),
                                                                      min_weight=("weight", "min"),
                                                                      max_weight=("weight", "max")).reset_index()
    parts = ["## Weighted fusion: the fitted weights", "",
             "Non-negative, L2-regularised logistic stacking of the normalised scores, fitted per block on the fit "
             "split (`weights.csv` has every subset). Weights of the fusion of all candidates, over blocks:", "",
             markdown_table(table, digits=3)]
    if rec.get("fusion") == "weighted":
        own = weights[(weights["members"] == "+".join(rec["members"]))
                      & (weights["normalization"] == rec["normalization"])]
        parts += ["The recommended ensemble's weights per block:", "",
                  markdown_table(own, [*BLOCK, "model", "weight", "intercept"], digits=3)]
    return parts


def _comparison_text(comparison: pd.DataFrame, confidence: float, n_boot: int) -> list[str]:
    if comparison.empty:
        return []
    columns = [*BLOCK, "ensemble", "best_single", "ensemble_auroc", "best_single_auroc", "difference", "ci_low",
               "ci_high", "oracle_single", "oracle_single_auroc", "ensemble_pixel_aupro", "best_single_pixel_aupro",
               "n_test"]
    return ["## Recommended ensemble vs the best single model (test split)", "",
            f"`difference` = image AUROC of the ensemble minus that of the best single model of the category "
            f"(chosen on the fit split); `ci_low`/`ci_high`: {confidence:.0%} paired bootstrap interval ({n_boot} "
            "resamples of the test images, normal and anomalous images resampled separately, both models scored on "
            "the same resample). An interval that excludes 0 means the difference is unlikely to be resampling "
            "noise. The last row averages the blocks. `oracle_single`: the best single model picked on the test "
            "split itself (optimistic, for reference). Pixel AUPRO as in the fused-map section below.", "",
            markdown_table(comparison, [c for c in columns if c in comparison.columns], digits=4)]


def _maps_text(maps: pd.DataFrame, rec: Mapping[str, Any]) -> list[str]:
    if maps.empty:
        return ["## Fused maps", "", "No pixel metrics: no recommended member produces anomaly maps, or no "
                "manifest (masks) was given.", ""]
    overall = maps[maps["defect_type"] == "all"].groupby(["entry", "members", "normalization", "fusion"], sort=False)[
        ["pixel_auroc", "pixel_aupro", "image_auroc"]].mean().reset_index()
    main = maps[maps["entry"].isin(["ensemble", "single"])]
    per_type = main.groupby(["defect_type", "entry", "members"], sort=False).agg(
        pixel_auroc=("pixel_auroc", "mean"), pixel_aupro=("pixel_aupro", "mean"), image_auroc=("image_auroc", "mean"),
        n_images=("n_images", "sum")).reset_index()
    notes = [f"- {n}" for n in rec.get("notes", [])]
    return ["## Fused maps (test split)", "",
            "Each member's compact map is normalised with its reference normal maps (the fit split's normal images), "
            "resized to the largest member map and fused with the ensemble's rule; singles are measured at the same "
            "size (masks resized to it). Means over blocks:", "",
            markdown_table(overall, digits=4),
            "### Per defect type (that type's images and every normal image; `n_images` summed over blocks)", "",
            markdown_table(per_type, digits=4), *notes, ""]


def ensemble_markdown(candidates: pd.DataFrame, diversity: pd.DataFrame, summary: pd.DataFrame,
                      weights: pd.DataFrame, rec: Mapping[str, Any], comparison: pd.DataFrame, maps: pd.DataFrame,
                      blocks: Sequence[Block], metric: str, top_k: int, confidence: float, n_boot: int,
                      runs: Mapping[tuple, MemberRun]) -> str:
    """The readable report (Markdown)."""
    chosen = candidates.loc[candidates["candidate"], "model"].tolist()
    column = f"fit_{metric}"
    reference = sorted({REFERENCES[b.fit_split] for b in blocks})
    parts = ["# Ensemble report", "", *_selection_text(blocks),
             "## Candidates", "",
             f"The {len(chosen)} models with the best mean rank by fit-split `{metric}` over categories "
             f"(top_k = {top_k}).", "",
             markdown_table(candidates, ["position", "model", "mean_rank", f"mean_{column}", "n_categories",
                                         "candidate"], digits=3)]
    if len(chosen) < 2:
        return "\n".join(parts + ["Fewer than two models have results, so there is nothing to fuse.", ""])
    parts += ["## Diversity (fit split)", "",
              "Spearman correlation of the candidates' scores and the overlap of the images they fail on (Jaccard "
              "of their failure sets at each model's own F1 threshold; `mean_joint_failure_rate`: share of images "
              "both fail on). Low values mean different mistakes, which is what fusion can exploit.", "",
              markdown_table(diversity, digits=3), "![diversity](diversity.png)", "",
              "## Combinations, chosen on the fit split", "",
              f"Normalisation statistics from the {' / '.join(reference)}. `mean_{column}`: the selection score "
              "(weighted fusion: out-of-fold, 5-fold cross-validated on the fit split); `mean_test_*`: the same "
              "combination on the test split, for the report only.", "",
              markdown_table(summary.head(20), ["members", "size", "normalization", "fusion", f"mean_{column}",
                                                f"std_{column}", "mean_test_image_auroc", "mean_test_image_aupr",
                                                "n_categories", "recommended"], digits=4)]
    if len(summary) > 20:
        parts += [f"({len(summary) - 20} more rows in fusion_summary.csv)", ""]
    parts += _weights_text(weights, rec, chosen)
    parts += ["## Recommendation", "", *_recommendation_text(rec, metric, runs)]
    parts += _comparison_text(comparison, confidence, n_boot)
    parts += _maps_text(maps, rec)
    return "\n".join(parts)
