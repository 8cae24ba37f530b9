"""Generic folders, for data in no known layout.

    <root>/<category>/<normal dir>/*          normal images (one or more folders)
    <root>/<category>/<abnormal dir>/*        anomalous images (one or more; folder name = defect type)
    <root>/<category>/<mask dir>/[<abnormal dir name>/]<stem>[_mask].*   optional masks

Folder options are paths relative to ``<root>/<category>``. Normal images are split into
train/test by a seeded ``train_ratio``, unless ``normal_test_dirs`` names separate test normals.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Sequence

import pandas as pd

from adlib.data.files import category_dir, images_by_stem, list_images, require_dir, subdirs
from adlib.data.manifest import NORMAL, DataError, check_category, make_manifest, manifest_row
from adlib.data.splits import split_normals

ROOT_HINT = "point 'root' at the folder that holds one sub-folder per category"
Dirs = str | Sequence[str]


def list_categories(root: str | os.PathLike, normal_dirs: Dirs = "normal", **_: object) -> list[str]:
    """Sub-folders of ``root`` that have the first normal folder."""
    root = require_dir(root, "folder data root", ROOT_HINT)
    first = _as_list(normal_dirs)[0]
    return [name for name in subdirs(root) if (root / name / first).is_dir()]


def index(root: str | os.PathLike, category: str, *, dataset: str | None = None,
          normal_dirs: Dirs = "normal", abnormal_dirs: Dirs = "abnormal", mask_dir: str | None = None,
          normal_test_dirs: Dirs | None = None, train_ratio: float = 0.8, seed: int = 0,
          require_masks: bool = True) -> pd.DataFrame:
    """Index one category. With ``mask_dir`` every anomalous image needs a mask unless
    ``require_masks=False``."""
    root = require_dir(root, "folder data root", ROOT_HINT)
    cat_dir = category_dir(root, category, list_categories(root, normal_dirs))
    dataset = dataset or "folder"
    normals = [p for d in _as_list(normal_dirs) for p in list_images(_folder(cat_dir, d, "normal"))]
    if normal_test_dirs:
        train = normals
        test = [p for d in _as_list(normal_test_dirs) for p in list_images(_folder(cat_dir, d, "normal test"))]
    else:
        train, test = split_normals(normals, train_ratio, seed)
    rows = [manifest_row(dataset, category, "train", p, "", 0, NORMAL) for p in train]
    rows += [manifest_row(dataset, category, "test", p, "", 0, NORMAL) for p in test]
    masks_root = _folder(cat_dir, mask_dir, "mask") if mask_dir else None
    for name in _as_list(abnormal_dirs):
        folder = _folder(cat_dir, name, "abnormal")
        defect = PurePath(name).name
        masks = {}
        if masks_root is not None:
            masks = images_by_stem(masks_root / defect) or images_by_stem(masks_root)
        for path in list_images(folder):
            mask = masks.get(path.stem) or masks.get(f"{path.stem}_mask")
            if masks_root is not None and mask is None and require_masks:
                raise DataError(f"anomalous image {path} has no mask: expected {masks_root / path.name} "
                                f"(or {masks_root / defect / path.name}, any image extension, optional "
                                "'_mask' suffix). Add it or index with require_masks=False")
            rows.append(manifest_row(dataset, category, "test", path, mask or "", 1, defect))
    return check_category(make_manifest(rows), f"category {category!r} at {cat_dir}",
                          f"put normal images in {cat_dir / _as_list(normal_dirs)[0]}")


def _as_list(dirs: Dirs) -> list[str]:
    items = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    if not items:
        raise DataError("folder layout: give at least one normal and one abnormal folder")
    return [str(item) for item in items]


def _folder(cat_dir: Path, relative: str, what: str) -> Path:
    """``cat_dir/relative``, which must stay inside ``cat_dir`` and exist."""
    if PurePath(relative).is_absolute() or ".." in PurePath(relative).parts:
        raise DataError(f"{what} folder {relative!r} must be a path relative to {cat_dir} without '..'")
    path = cat_dir / relative
    if not path.is_dir():
        raise DataError(f"{what} folder {path} does not exist; create it or fix the folder option")
    return path
