"""The real magnetic tile set (MVTec layout) at ../shared/data, when it is there."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adlib.data import DataWarning, ImageDataset, index_dataset, list_categories

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (DATA_ROOT / "magnetic_tile").is_dir(),
                       reason=f"magnetic tile data set not found at {DATA_ROOT / 'magnetic_tile'}"),
]
DEFECTS = {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}


@pytest.fixture(scope="module")
def manifest():
    return index_dataset("mvtec", DATA_ROOT, "magnetic_tile", dataset="magnetic_tile")


def test_counts(manifest):
    assert "magnetic_tile" in list_categories("mvtec", DATA_ROOT)
    train, test = manifest[manifest.split == "train"], manifest[manifest.split == "test"]
    assert len(train) == 752 and (train["label"] == 0).all()
    assert (test["label"] == 0).sum() == 200
    assert (test["label"] == 1).sum() == 392
    assert test[test.label == 1]["defect_type"].value_counts().to_dict() == DEFECTS


def test_masks_aligned(manifest):
    defective = manifest[manifest.label == 1]
    assert all(Path(m).is_file() for m in defective["mask_path"])
    for image, mask in zip(defective["image_path"], defective["mask_path"]):
        image, mask = Path(image), Path(mask)
        assert mask.name == f"{image.stem}_mask.png" and mask.parent.name == image.parent.name
    assert (manifest.loc[manifest.label == 0, "mask_path"] == "").all()
    empty = [m for m in defective.loc[defective.defect_type == "uneven", "mask_path"]
             if not np.asarray(Image.open(m)).any()]
    assert len(empty) == 4  # legal: defective images whose source masks are empty


def test_grayscale_jpegs_decode_to_rgb(manifest):
    dataset = ImageDataset(manifest, img_size=64)
    rows = [0, int(manifest.index[manifest.label == 1][0]), len(manifest) - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # masks match their images: no resize warning
        items = [dataset[i] for i in rows]
    assert all(item["image"].shape == (3, 64, 64) for item in items)
    assert all(np.allclose(item["image"][0], item["image"][1]) for item in items)  # gray copied to RGB
    assert items[1]["label"] == 1 and items[1]["mask"].sum() > 0
