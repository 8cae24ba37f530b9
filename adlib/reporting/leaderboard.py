"""Leaderboard (one row per run), per-model summary and per-category ranks, from per-run files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from adlib.io import atomic_path
from adlib.reporting.runs import RUN_KEYS, THRESHOLD_METHODS, check_consistent, read_run_json, run_identity

#: metrics a ranking can use (higher is better for all of them)
RANK_METRICS = ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "pixel_aupro")
#: numeric leaderboard columns summarised per model (mean and std over categories and seeds)
SUMMARY_COLUMNS = (*RANK_METRICS, "fit_seconds", "inference_ms_b1", "inference_ms_batch", "peak_rss_mb",
                   "peak_cuda_mb")
TILING_COLUMNS = ("tile_size", "tile_stride", "tile_blend", "tiles_per_image", "tile_image_size")
_PROVENANCE = ("device", "gpu", "cpu", "hostname", "adlib_version", "torch_version", "timm_version", "python",
               "git_commit", "config_hash", "random_backbone", "created")


def leaderboard_row(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the leaderboard knows about one finished run (config, fit, metrics, provenance)."""
    metrics = read_run_json(run_dir, "metrics.json")
    model_dir = Path(run_dir) / metrics.get("model_dir", ".")  # dataset-scope runs train elsewhere
    check_consistent(run_dir, model_dir, metrics)
    config = read_run_json(model_dir, "config.json")
    fit = read_run_json(model_dir, "fit.json")
    prov = read_run_json(model_dir, "provenance.json")
    model, train = config.get("model", {}), config.get("train", {})
    row: dict[str, Any] = {
        **run_identity(run_dir),
        "model_name": config.get("name"),
        "family": config.get("family"),
        "backbone": prov.get("backbone") or model.get("backbone"),
        "img_size": train.get("img_size"),
        **tiling_columns(train),
        "num_epochs": train.get("num_epochs"),
        "batch_size": train.get("batch_size"),
        "epochs_run": fit.get("epochs_run"),
        "steps": fit.get("steps"),
    }
    for key in RANK_METRICS:
        row[key] = metrics.get(key)
    for key in ("n_test", "n_normal", "n_anomalous"):
        row[key] = metrics.get(key)
    for kind, prefix in (("thresholds", "thr"), ("transferred_thresholds", "thr_transferred")):
        results = metrics.get(kind) or {}
        for method in THRESHOLD_METHODS:
            result = results.get(method) or {}
            for field in ("threshold", "f1", "accuracy"):
                row[f"{prefix}_{method}_{field}"] = result.get(field)
    row.update({
        "fit_seconds": fit.get("fit_seconds"),
        "inference_ms_b1": metrics.get("inference_ms_b1"),
        "inference_ms_b1_p25": metrics.get("inference_ms_b1_p25"),
        "inference_ms_b1_p75": metrics.get("inference_ms_b1_p75"),
        "inference_ms_batch": metrics.get("inference_ms_batch"),
        "inference_ms_batch_p25": metrics.get("inference_ms_batch_p25"),
        "inference_ms_batch_p75": metrics.get("inference_ms_batch_p75"),
        "timing_load_1min": (metrics.get("timing") or {}).get("load_1min"),
        "timing_threads": (metrics.get("timing") or {}).get("torch_threads"),
        "peak_rss_mb": fit.get("peak_rss_mb"),
        "peak_cuda_mb": fit.get("peak_cuda_mb"),
        "num_parameters": fit.get("num_parameters"),
        "num_train_images": fit.get("num_train_images"),
        "final_loss": fit.get("final_loss"),
        "stopped_early": fit.get("stopped_early"),
        "pretrained": config.get("pretrained"),
        "scope": prov.get("scope", "category"),
        "supervision": "supervised" if prov.get("train_labels") == "labelled" else "unsupervised",
        "auxiliary_data": "; ".join(f"{k}={v}" for k, v in sorted((prov.get("auxiliary") or {}).items())),
        "validation": prov.get("validation"),
    })
    row.update({key: prov.get(key) for key in _PROVENANCE})
    row["defect_image_auroc"] = "; ".join(f"{name}={_short(values.get('image_auroc'))}"
                                          for name, values in (metrics.get("per_defect_type") or {}).items())
    row["notes"] = "; ".join(str(n) for n in metrics.get("notes") or [])
    row["run_dir"] = str(run_dir)
    return row


def tiling_columns(train: dict) -> dict[str, Any]:
    """A run's tiling (docs/tiling.md): tile side, stride, blending, training tiles per image and
    the image size tiles are cut from (``full``, ``long<L>``, ``<H>x<W>``); all None when untiled."""
    from adlib.data.images import KeepAspect

    tile = train.get("tile_size")
    if tile is None:
        return dict.fromkeys(TILING_COLUMNS)
    size = train.get("tile_image_size")
    return {"tile_size": tile, "tile_stride": train.get("tile_stride") or tile,
            "tile_blend": train.get("tile_blend") or "mean", "tiles_per_image": train.get("tiles_per_image"),
            "tile_image_size": KeepAspect.of(size).label}


def _short(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


DEFECT_METRICS = ("n", "image_auroc", "image_aupr", "pixel_auroc", "pixel_aupro")


def defect_rows(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per defect type of a run: its metrics against the run's normal test images."""
    metrics = read_run_json(run_dir, "metrics.json")
    return [{**run_identity(run_dir), "defect_type": name, **{k: values.get(k) for k in DEFECT_METRICS}}
            for name, values in (metrics.get("per_defect_type") or {}).items()]


def build_defect_table(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The per-defect-type leaderboard: one row per run and defect type."""
    rows = [row for d in run_dirs for row in defect_rows(d)]
    frame = pd.DataFrame(rows, columns=[*RUN_KEYS, "defect_type", *DEFECT_METRICS])
    return frame.sort_values([*RUN_KEYS, "defect_type"], kind="stable").reset_index(drop=True)


def build_leaderboard(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The long-form leaderboard: one row per run, sorted by dataset, category, model, seed."""
    rows = [leaderboard_row(d) for d in run_dirs]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for key in RANK_METRICS + ("fit_seconds", "inference_ms_b1", "inference_ms_batch", "peak_rss_mb",
                               "peak_cuda_mb"):
        frame[key] = pd.to_numeric(frame[key], errors="coerce").astype(float)
    return frame.sort_values(list(RUN_KEYS), kind="stable").reset_index(drop=True)


def category_ranks(leaderboard: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """Per (dataset, category): each model's ``metric`` averaged over seeds and its rank (1 = best).

    Ties share the average rank; runs whose metric is missing are left out of their block.
    """
    _check_metric(metric)
    per_model = (leaderboard.dropna(subset=[metric])
                 .groupby(["dataset", "category", "model"], sort=True)[metric].mean().reset_index())
    per_model["rank"] = per_model.groupby(["dataset", "category"])[metric].rank(ascending=False, method="average")
    per_model["n_models"] = per_model.groupby(["dataset", "category"])["model"].transform("count")
    return per_model


def summarize_models(leaderboard: pd.DataFrame, ranks: pd.DataFrame | None = None,
                     metric: str = "image_auroc") -> pd.DataFrame:
    """One row per model: mean and std over categories and seeds, and its mean rank."""
    if ranks is None:
        ranks = category_ranks(leaderboard, metric)
    leaderboard = leaderboard.assign(_dataset_category=leaderboard["dataset"].astype(str) + "/"
                                     + leaderboard["category"].astype(str))  # same names in two data sets differ
    groups = leaderboard.groupby("model", sort=True)
    summary = groups.agg(model_name=("model_name", "first"), family=("family", "first"),
                         backbone=("backbone", "first"), n_runs=("seed", "size"),
                         n_categories=("_dataset_category", "nunique"),
                         num_parameters=("num_parameters", "first"))
    for column in SUMMARY_COLUMNS:
        summary[f"{column}_mean"] = groups[column].mean()
        summary[f"{column}_std"] = groups[column].std(ddof=1)
    mean_rank = ranks.groupby("model")["rank"].mean()
    summary["mean_rank"] = mean_rank.reindex(summary.index)
    summary["rank_metric"] = metric
    summary = summary.reset_index()
    return summary.sort_values(["mean_rank", f"{metric}_mean"], ascending=[True, False],
                               na_position="last", kind="stable").reset_index(drop=True)


def _check_metric(metric: str) -> None:
    if metric not in RANK_METRICS:
        raise ValueError(f"unknown rank metric {metric!r}; choose one of {', '.join(RANK_METRICS)}")


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically as CSV or Parquet (by suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            _parquet_safe(frame).to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            raise ValueError(f"{path}: tables are written as .csv or .parquet")
    return path


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing types (e.g. None and float) become strings or floats for Parquet."""
    frame = frame.copy()
    for column in frame.columns[frame.dtypes == object]:
        values = frame[column].dropna()
        kinds = {type(v) for v in values}
        if kinds <= {int, float, np.floating, np.integer} and kinds:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        elif kinds <= {bool, np.bool_} and kinds:
            frame[column] = frame[column].astype("boolean")
        elif kinds and kinds != {str}:
            frame[column] = frame[column].map(lambda v: None if v is None or v != v else str(v))
    return frame


def write_leaderboard(run_dirs: Iterable[str | os.PathLike], csv: str | os.PathLike, parquet: str | os.PathLike,
                      summary_csv: str | os.PathLike, ranks_csv: str | os.PathLike,
                      metric: str = "image_auroc", defects_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """Build the leaderboard from run directories and write it with the per-model summary, ranks
    and (``defects_csv``) the per-defect-type table."""
    _check_metric(metric)
    run_dirs = list(run_dirs)
    if defects_csv is not None:
        write_table(build_defect_table(run_dirs), defects_csv)
    board = build_leaderboard(run_dirs)
    if board.empty:
        raise ValueError("no runs given: the leaderboard needs at least one finished run")
    ranks = category_ranks(board, metric)
    write_table(board, csv)
    write_table(board, parquet)
    write_table(summarize_models(board, ranks, metric), summary_csv)
    write_table(ranks, ranks_csv)
    return board
