"""The manifest: one row per image, no tensors. Every indexer returns one of these tables."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import pandas as pd

#: Columns every manifest has, in order. ``mask_path`` is "" when an image has no mask.
MANIFEST_COLUMNS = ("dataset", "category", "split", "image_path", "mask_path", "label", "defect_type")
SPLITS = ("train", "test", "calibration")
NORMAL = "good"  # defect_type of every normal image


class DataError(ValueError):
    """Bad or missing input data; the message names the file and what to do."""


class DataWarning(UserWarning):
    """Suspicious but usable input data (ignored files, resized masks, one-sided test sets)."""


def manifest_row(dataset: str, category: str, split: str, image: object, mask: object, label: int,
                 defect_type: str) -> dict:
    """One manifest row; paths become strings ("" for no mask)."""
    return {"dataset": dataset, "category": category, "split": split, "image_path": str(image),
            "mask_path": str(mask) if mask else "", "label": int(label), "defect_type": defect_type}


def make_manifest(rows: Iterable[dict]) -> pd.DataFrame:
    """Build a manifest from row dicts (extra keys become extra columns), typed and sorted."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        df = pd.DataFrame({column: pd.Series(dtype="int64" if column == "label" else "str")
                           for column in MANIFEST_COLUMNS})
    missing = [column for column in MANIFEST_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"manifest rows lack columns {missing}")
    df["mask_path"] = df["mask_path"].fillna("").astype(str)
    df["label"] = df["label"].astype("int64")
    extra = [column for column in df.columns if column not in MANIFEST_COLUMNS]
    return sort_manifest(df[list(MANIFEST_COLUMNS) + extra])


def sort_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic row order: dataset, category, split (train, calibration, test), label, path."""
    order = df["split"].map({split: i for i, split in enumerate(("train", "calibration", "test"))})
    df = df.assign(_split_order=order.fillna(len(SPLITS)))
    df = df.sort_values(["dataset", "category", "_split_order", "label", "defect_type", "image_path"],
                        kind="stable")
    return df.drop(columns="_split_order").reset_index(drop=True)


def validate_manifest(df: pd.DataFrame, source: str = "manifest") -> pd.DataFrame:
    """Check columns, splits and labels; return the table unchanged."""
    missing = [column for column in MANIFEST_COLUMNS if column not in df.columns]
    if missing:
        raise DataError(f"{source} lacks columns {missing}; it must have {list(MANIFEST_COLUMNS)}. "
                        "Re-create it with adlib.data.index_dataset.")
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(f"{source} has unknown splits {bad_split}; allowed: {list(SPLITS)}")
    bad_label = sorted(set(df["label"].tolist()) - {0, 1})
    if bad_label:
        raise DataError(f"{source} has labels {bad_label}; labels must be 0 (normal) or 1 (anomalous)")
    return df


def check_category(df: pd.DataFrame, where: str, train_hint: str) -> pd.DataFrame:
    """Error when a category has no training images; warn when its test set is one-sided.

    ``where`` names the category in messages, e.g. "category 'bottle' at /data/mvtec/bottle".
    """
    train = df[df["split"] == "train"]
    if train.empty:
        raise DataError(f"no training images found for {where}; {train_hint}")
    test = df[df["split"] != "train"]
    if test.empty:
        warnings.warn(f"{where}: no test images; models can be trained but not evaluated",
                      DataWarning, stacklevel=3)
    elif (test["label"] == 1).sum() == 0:
        warnings.warn(f"{where}: the test set has no anomalous images; metrics that need both "
                      "classes (AUROC, thresholds) will be reported as missing", DataWarning, stacklevel=3)
    elif (test["label"] == 0).sum() == 0:
        warnings.warn(f"{where}: the test set has no normal images; metrics that need both "
                      "classes (AUROC, thresholds) will be reported as missing", DataWarning, stacklevel=3)
    return df


def save_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest as Parquet, atomically."""
    from adlib.io import atomic_path

    validate_manifest(df)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest written by :func:`save_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; create it with adlib.data.index_dataset "
                        "and save_manifest (or the workflow's data rule)")
    df = validate_manifest(pd.read_parquet(path), source=f"manifest {path}")
    return df.assign(mask_path=df["mask_path"].fillna("").astype(str), label=df["label"].astype("int64"))
