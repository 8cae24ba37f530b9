"""Pixel metrics of (fused) anomaly maps at the maps' own size, over all test images and per
defect type, with ground-truth masks read through adlib.data.

Per defect type, the images of that type and every normal image are scored together (pixel
AUROC, AUPRO, and the image AUROC of that type against the normals). The numbers are computed
on compact maps (at most 128 px a side) with masks resized to them (nearest), so they differ
slightly from a run's metrics.json, which compares full-size maps; within the report every
model and ensemble is measured the same way.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from adlib.evaluation import PixelMetrics, image_auroc

#: images added to the pixel accumulator at once
CHUNK = 32


def read_masks(manifest: pd.DataFrame, image_paths: Sequence[str], size: tuple[int, int], view: float = 1.0
               ) -> np.ndarray:
    """Boolean masks ``[n, H, W]`` of ``image_paths`` at map ``size``; ``view`` (center_crop /
    img_size of the models) cuts the same central part the maps cover."""
    from PIL import Image

    from adlib.data.images import read_mask, resize_crop

    rows = manifest.drop_duplicates("image_path").set_index("image_path")
    missing = [p for p in image_paths if p not in rows.index]
    if missing:
        raise ValueError(f"{len(missing)} scored images are not in the manifest (e.g. {missing[0]}); pass the "
                         "manifest the runs were evaluated on")
    h, w = size
    out = np.zeros((len(image_paths), h, w), dtype=bool)
    for i, path in enumerate(image_paths):
        mask_path = str(rows.at[path, "mask_path"] or "")
        if not mask_path:
            continue
        with Image.open(path) as image:
            native = image.size
        mask = read_mask(mask_path, native)
        mask = mask.resize((w, h), Image.NEAREST) if view == 1.0 else resize_crop(mask, round(h / view), h,
                                                                                   Image.NEAREST)
        out[i] = np.asarray(mask) > 0
    return out


def pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """Pixel AUROC and AUPRO of ``maps`` against ``masks`` (streamed, bounded memory)."""
    if len(maps) == 0:
        return {"pixel_auroc": None, "pixel_aupro": None}
    accumulator = PixelMetrics(score_range=(float(maps.min()), float(maps.max())))
    for start in range(0, len(maps), CHUNK):
        accumulator.update(maps[start:start + CHUNK], masks[start:start + CHUNK])
    result = accumulator.compute()
    return {"pixel_auroc": result["pixel_auroc"], "pixel_aupro": result["pixel_aupro"]}


def metrics_by_defect_type(maps: np.ndarray | None, masks: np.ndarray | None, labels: np.ndarray,
                           scores: np.ndarray, defect_types: np.ndarray) -> list[dict[str, Any]]:
    """One row for all test images and one per defect type: pixel metrics (``None`` without
    maps), image AUROC, number of images."""
    subsets = [("all", np.ones(len(labels), dtype=bool))]
    subsets += [(t, (labels == 0) | (defect_types == t))
                for t in sorted(set(defect_types[labels == 1].tolist()))]
    rows = []
    for name, keep in subsets:
        pixels = (pixel_metrics(maps[keep], masks[keep]) if maps is not None
                  else {"pixel_auroc": None, "pixel_aupro": None})
        rows.append({"defect_type": name, **pixels, "image_auroc": image_auroc(labels[keep], scores[keep]),
                     "n_images": int(keep.sum())})
    return rows
