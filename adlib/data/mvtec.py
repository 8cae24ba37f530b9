"""MVTec AD layout, and every "MVTec-like" set (e.g. the magnetic tile set).

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Image extensions png/jpg/jpeg/bmp/tif/tiff in any case; masks may use any of them too.
"""
from __future__ import annotations

import os

import pandas as pd

from adlib.data.files import category_dir, images_by_stem, list_images, require_dir, subdirs
from adlib.data.manifest import NORMAL, DataError, check_category, make_manifest, manifest_row

ROOT_HINT = "point 'root' at the folder that holds one sub-folder per category (<root>/<category>/train/good)"


def list_categories(root: str | os.PathLike) -> list[str]:
    """Sub-folders of ``root`` that have a ``train`` folder."""
    root = require_dir(root, "MVTec data root", ROOT_HINT)
    return [name for name in subdirs(root) if (root / name / "train").is_dir()]


def index(root: str | os.PathLike, category: str, *, dataset: str | None = None,
          require_masks: bool = True) -> pd.DataFrame:
    """Index one category. A defective test image without a mask is an error unless
    ``require_masks=False`` (then its ``mask_path`` is "")."""
    root = require_dir(root, "MVTec data root", ROOT_HINT)
    cat_dir = category_dir(root, category, list_categories(root))
    dataset = dataset or "mvtec"
    rows = []
    train_dir = cat_dir / "train" / NORMAL
    for path in list_images(train_dir):
        rows.append(manifest_row(dataset, category, "train", path, "", 0, NORMAL))
    test_dir = cat_dir / "test"
    for defect in subdirs(test_dir):
        masks = images_by_stem(cat_dir / "ground_truth" / defect)
        for path in list_images(test_dir / defect):
            if defect == NORMAL:
                rows.append(manifest_row(dataset, category, "test", path, "", 0, NORMAL))
                continue
            mask = masks.get(f"{path.stem}_mask") or masks.get(path.stem)
            if mask is None and require_masks:
                expected = cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                raise DataError(f"defective image {path} has no mask: expected {expected}. Add the mask "
                                "(an all-black mask is fine), remove the image, or index with "
                                "require_masks=False to use image labels only")
            rows.append(manifest_row(dataset, category, "test", path, mask or "", 1, defect))
    df = make_manifest(rows)
    return check_category(df, f"category {category!r} at {cat_dir}", f"put normal images in {train_dir}")

