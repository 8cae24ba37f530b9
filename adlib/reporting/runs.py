"""Reading the per-run files of finished runs: the source of every aggregate.

A run directory is ``.../{dataset}/{category}/{model}/{seed}``; those four names are the run's
identity in every table (``model`` is the workflow's label, ``model_name`` the registry name).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from adlib.evaluation.thresholds import CONFUSION_KEYS, METHODS as THRESHOLD_METHODS
from adlib.io import read_json

RUN_KEYS = ("dataset", "category", "model", "seed")
__all__ = ["CONFUSION_KEYS", "RUN_KEYS", "THRESHOLD_METHODS", "RunFileError", "read_all_scores", "read_run_json",
           "read_scores", "run_identity"]


class RunFileError(ValueError):
    """A per-run file is missing or malformed; the message names the file."""


def run_identity(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"dataset", "category", "model", "seed"}`` from the last four parts of a run directory."""
    parts = Path(run_dir).parts
    if len(parts) < 4:
        raise RunFileError(f"{run_dir} is not a run directory (expected .../dataset/category/model/seed)")
    dataset, category, model, seed = parts[-4:]
    try:
        seed_value: Any = int(seed)
    except ValueError:
        seed_value = seed
    return {"dataset": dataset, "category": category, "model": model, "seed": seed_value}


def read_run_json(run_dir: str | os.PathLike, name: str, required: bool = True) -> dict[str, Any]:
    """One JSON file of a run; a clear error when it is missing or not an object."""
    path = Path(run_dir) / name
    if not path.is_file():
        if not required:
            return {}
        raise RunFileError(f"{path} is missing: the run in {run_dir} is incomplete; rerun the workflow "
                           "(it redoes only missing work)")
    try:
        data = read_json(path)
    except ValueError as err:
        raise RunFileError(f"{path} is not valid JSON ({err}); delete it and rerun the workflow") from err
    if not isinstance(data, dict):
        raise RunFileError(f"{path} must hold a JSON object")
    return data


def check_consistent(run_dir: str | os.PathLike, model_dir: str | os.PathLike, metrics: dict) -> None:
    """The run's evaluation belongs to the model in its model folder (completion records agree)."""
    from adlib.artifacts import RunStateError, check_evaluated

    try:
        check_evaluated(run_dir, model_dir, metrics)
    except RunStateError as err:
        raise RunFileError(str(err)) from None


def read_scores(run_dir: str | os.PathLike) -> pd.DataFrame:
    """scores.parquet of a run with the run's identity columns added."""
    path = Path(run_dir) / "scores.parquet"
    if not path.is_file():
        raise RunFileError(f"{path} is missing: the run in {run_dir} was not evaluated; rerun the workflow")
    frame = pd.read_parquet(path)
    missing = {"image_path", "label", "score"} - set(frame.columns)
    if missing:
        raise RunFileError(f"{path} lacks columns {sorted(missing)}")
    if "split" not in frame.columns:
        frame["split"] = "test"
    for key, value in run_identity(run_dir).items():
        frame[key] = value
    return frame


def read_all_scores(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """scores.parquet of many runs stacked (identity columns first)."""
    frames = [read_scores(d) for d in run_dirs]
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEYS, "image_path", "label", "score", "split"])
    frame = pd.concat(frames, ignore_index=True)
    return frame[[*RUN_KEYS, *[c for c in frame.columns if c not in RUN_KEYS]]]
