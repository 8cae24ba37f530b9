"""BTAD layout (beanTech Anomaly Detection; categories 01, 02, 03).

    <root>/<category>/train/ok/*.bmp|png
    <root>/<category>/test/ok/*
    <root>/<category>/test/ko/*
    <root>/<category>/ground_truth/ko/<stem>.png|bmp   (``<stem>_mask.*`` is accepted too)
"""
from __future__ import annotations

import os

import pandas as pd

from adlib.data.files import category_dir, images_by_stem, list_images, require_dir, subdirs
from adlib.data.manifest import NORMAL, DataError, check_category, make_manifest, manifest_row

ROOT_HINT = "point 'root' at the folder that holds 01/, 02/, 03/ (each with train/ok)"
DEFECT = "ko"


def list_categories(root: str | os.PathLike) -> list[str]:
    """Sub-folders of ``root`` that have ``train/ok``."""
    root = require_dir(root, "BTAD data root", ROOT_HINT)
    return [name for name in subdirs(root) if (root / name / "train" / "ok").is_dir()]


def index(root: str | os.PathLike, category: str, *, dataset: str | None = None,
          require_masks: bool = True) -> pd.DataFrame:
    """Index one BTAD category; ``ko`` images are anomalous (defect_type "ko")."""
    root = require_dir(root, "BTAD data root", ROOT_HINT)
    cat_dir = category_dir(root, category, list_categories(root))
    dataset = dataset or "btad"
    train_dir = cat_dir / "train" / "ok"
    rows = [manifest_row(dataset, category, "train", p, "", 0, NORMAL)
            for p in list_images(train_dir)]
    rows += [manifest_row(dataset, category, "test", p, "", 0, NORMAL) for p in list_images(cat_dir / "test" / "ok")]
    masks = images_by_stem(cat_dir / "ground_truth" / DEFECT)
    for path in list_images(cat_dir / "test" / DEFECT):
        mask = masks.get(path.stem) or masks.get(f"{path.stem}_mask")
        if mask is None and require_masks:
            expected = cat_dir / "ground_truth" / DEFECT / f"{path.stem}.png"
            raise DataError(f"defective image {path} has no mask: expected {expected} (or .bmp). Add "
                            "the mask, remove the image, or index with require_masks=False")
        rows.append(manifest_row(dataset, category, "test", path, mask or "", 1, DEFECT))
    return check_category(make_manifest(rows), f"category {category!r} at {cat_dir}",
                          f"put normal images in {train_dir}")
