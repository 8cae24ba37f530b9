"""Data sets: indexers (one per layout) that build manifests, one torch Dataset, the image cache.

    df = index_dataset("mvtec", "/data/mvtec", ["bottle", "wood"], calibration_fraction=0.2)
    cache = ImageCache.build(df, "/scratch/cache", img_size=256)
    train = ImageDataset(df[df.split == "train"], img_size=256, cache=cache)

See docs/datasets.md for the layouts, the custom format and the bad-input policy.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable, Iterable

import pandas as pd

from adlib.data import btad, custom, folder, mvtec, synthetic, visa
from adlib.data.auxiliary import list_aux_images, resolve_imagenet_dir, resolve_texture_dir
from adlib.data.files import IMAGE_EXTENSIONS, check_name
from adlib.data.images import IMAGENET_MEAN, IMAGENET_STD, load_sample
from adlib.data.manifest import (MANIFEST_COLUMNS, SPLITS, DataError, DataWarning, load_manifest,
                                 make_manifest, save_manifest, sort_manifest)
from adlib.data.splits import carve_calibration, split_normals

def __getattr__(name: str):
    # the torch Dataset and the cache are imported on first use: listing or indexing data (the CLI,
    # the workflow's dry run) does not need torch
    if name == "ImageDataset":
        from adlib.data.dataset import ImageDataset

        return ImageDataset
    if name == "ImageCache":
        from adlib.data.cache import ImageCache

        return ImageCache
    raise AttributeError(f"module 'adlib.data' has no attribute {name!r}")


#: Layout name -> indexer ``(root, category, *, dataset=None, **options) -> manifest``.
LAYOUTS: dict[str, Callable[..., pd.DataFrame]] = {
    "mvtec": mvtec.index,
    "visa": visa.index,
    "btad": btad.index,
    "custom": custom.index,
    "folder": folder.index,
    "synthetic": synthetic.index,
}
_CATEGORIES: dict[str, Callable[..., list[str]]] = {
    "mvtec": mvtec.list_categories,
    "visa": visa.list_categories,
    "btad": btad.list_categories,
    "custom": custom.list_categories,
    "folder": folder.list_categories,
    "synthetic": synthetic.list_categories,
}


def _layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise DataError(f"unknown data set layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    return layout


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the data set at ``root``: the one whose indexer finds categories there
    (custom and folder layouts must be named, they match almost any folder)."""
    from pathlib import Path

    root = Path(root)
    if (root / "data_rgb").is_dir() or any((p / "data_rgb").is_dir() for p in root.iterdir() if p.is_dir()):
        return "custom"
    if (root / "split_csv").is_dir():
        return "visa"
    found = [layout for layout in ("btad", "mvtec") if _lists_categories(layout, root)]
    if found:
        return found[0]  # BTAD's train/ok is more specific than MVTec's train/<anything>
    raise DataError(f"cannot tell the layout of the data set at {root}: no <category>/train/good (mvtec), "
                    "<category>/train/ok (btad), split_csv/ (visa) or data_rgb/ (custom) found. Name it with "
                    "layout=... (CLI --layout): mvtec, visa, btad, custom or folder, and point root at its folder")


def _lists_categories(layout: str, root) -> bool:
    try:
        return bool(list_categories(layout, root))
    except (DataError, OSError):
        return False


def list_categories(layout: str, root: str | os.PathLike, **options) -> list[str]:
    """Every category of the data set at ``root`` (what ``categories="all"`` means)."""
    lister = _CATEGORIES[_layout(layout)]
    accepted = inspect.signature(lister).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        options = {k: v for k, v in options.items() if k in accepted}
    return lister(root, **options)


def index_dataset(layout: str, root: str | os.PathLike, categories: str | Iterable[str] = "all", *,
                  dataset: str | None = None, calibration_fraction: float = 0.0, seed: int = 0,
                  **layout_options) -> pd.DataFrame:
    """Manifest of one data set: one or several categories, or "all" of them.

    ``dataset`` names the data set in the manifest (default: the layout name; for the custom
    layout also the dataset folder under ``root``). ``seed`` seeds the calibration draw and is the
    default ``seed`` option of layouts that have one (custom and folder: the normal train/test
    split; synthetic: the generated images).
    ``calibration_fraction`` moves that share of each category's test images (normals and
    anomalies alike) to a "calibration" split.
    """
    indexer = LAYOUTS[_layout(layout)]
    if dataset is not None:
        check_name(dataset, "dataset")
    if "seed" in inspect.signature(indexer).parameters:
        layout_options.setdefault("seed", seed)
    if isinstance(categories, str):
        categories = (list_categories(layout, root, dataset=dataset, **layout_options)
                      if categories == "all" else [categories])
    categories = list(dict.fromkeys(categories))
    if not categories:
        raise DataError(f"no categories found in {root} (layout {layout!r}); check the root folder")
    frames = [indexer(root, category, dataset=dataset, **layout_options) for category in categories]
    return carve_calibration(sort_manifest(pd.concat(frames, ignore_index=True)), calibration_fraction, seed)


def index_many(specs: list[dict], *, calibration_fraction: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """One manifest over several data sets. Each spec: ``{"name", "layout", "root",
    "categories" (default "all"), "options" (layout options, default {})}``; names must differ."""
    frames, names = [], set()
    for spec in specs:
        unknown = set(spec) - {"name", "layout", "root", "categories", "options"}
        if unknown or not {"name", "layout", "root"} <= set(spec):
            raise DataError(f"data set spec {spec} needs keys name, layout, root (optional: categories, "
                            f"options); unknown keys: {sorted(unknown)}")
        if spec["name"] in names:
            raise DataError(f"data set name {spec['name']!r} is used twice; give each data set its own name")
        names.add(spec["name"])
        frames.append(index_dataset(spec["layout"], spec["root"], spec.get("categories", "all"),
                                    dataset=spec["name"], calibration_fraction=calibration_fraction,
                                    seed=seed, **spec.get("options", {})))
    if not frames:
        raise DataError("index_many needs at least one data set spec")
    return sort_manifest(pd.concat(frames, ignore_index=True))


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LAYOUTS", "MANIFEST_COLUMNS", "SPLITS",
    "DataError", "DataWarning", "ImageCache", "ImageDataset", "carve_calibration", "detect_layout", "index_dataset",
    "index_many", "list_aux_images", "list_categories", "load_manifest", "load_sample", "make_manifest",
    "resolve_imagenet_dir", "resolve_texture_dir", "save_manifest", "sort_manifest", "split_normals",
]
