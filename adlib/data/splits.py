"""Seeded splits: normal images into train/test, and a calibration set carved from the test set."""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import pandas as pd

from adlib.data.manifest import sort_manifest

T = TypeVar("T")


def split_normals(items: Sequence[T], train_ratio: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle ``items`` (sorted first, so the input order does not matter) with ``seed`` and
    put ``round(train_ratio * n)`` of them in train, the rest in test."""
    if not 0.0 < train_ratio <= 1.0:
        raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}")
    items = sorted(items)
    order = np.random.default_rng(seed).permutation(len(items))
    n_train = int(round(train_ratio * len(items)))
    train = sorted(items[i] for i in order[:n_train])
    test = sorted(items[i] for i in order[n_train:])
    return train, test


def carve_calibration(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded, stratified ``fraction`` of each category's test images to "calibration".

    Stratified by (dataset, category, label): normals and anomalies are both drawn, at least one
    of each class that has two or more test images, so the test set keeps both classes too.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return df
    df = df.copy()
    rng = np.random.default_rng(seed)
    test = df[df["split"] == "test"]
    for _, group in test.groupby(["dataset", "category", "label"], sort=True):
        n = len(group)
        take = min(max(int(round(fraction * n)), 1 if n >= 2 else 0), n - 1)
        if take > 0:
            chosen = rng.choice(np.sort(group.index.to_numpy()), size=take, replace=False)
            df.loc[chosen, "split"] = "calibration"
    return sort_manifest(df)


def carve_validation(train: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation): a seeded ``fraction`` of each category's normal training images held out.

    The validation split is for early stopping and post-training statistics (normalisation,
    quantiles); it never contains test or calibration images. At least one image stays in train.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    normal = train[train["label"] == 0]
    if fraction == 0.0 or normal.empty:
        return train.reset_index(drop=True), train.iloc[0:0].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    chosen: list = []
    for _, group in normal.groupby(["dataset", "category"], sort=True):
        take = min(max(int(round(fraction * len(group))), 1), len(group) - 1)
        if take > 0:
            chosen.extend(rng.choice(np.sort(group.index.to_numpy()), size=take, replace=False).tolist())
    held = train.index.isin(chosen)
    return train[~held].reset_index(drop=True), train[held].reset_index(drop=True)


def carve_labelled_train(manifest: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded ``fraction`` of the anomalous test images (per category and defect type, at
    least one of each type with two or more images) to the train split, masks included.

    For configurations that train on labelled anomalies; the moved images leave the test split,
    so they are never evaluated on.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1) for a configuration that trains on labelled "
                         f"anomalous images, got {fraction}")
    df = manifest.copy()
    rng = np.random.default_rng(seed)
    anomalous = df[(df["split"] == "test") & (df["label"] == 1)]
    for _, group in anomalous.groupby(["dataset", "category", "defect_type"], sort=True):
        take = min(max(int(round(fraction * len(group))), 1 if len(group) >= 2 else 0), len(group) - 1)
        if take > 0:
            df.loc[rng.choice(np.sort(group.index.to_numpy()), size=take, replace=False), "split"] = "train"
    return sort_manifest(df)
