"""Bad input: each case gives a specific error (or warning) naming the file and what to do.

Invalid custom file names are tested in test_data_custom.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adlib.data import DataError, DataWarning, ImageCache, ImageDataset, index_dataset, load_manifest
from adlib.data.synthetic import make_dataset


@pytest.fixture()
def mvtec(tmp_path) -> Path:
    return make_dataset("mvtec", tmp_path / "mvtec", categories=("widget",), n_train=3, n_test_good=2,
                        n_test_bad=4, size=24)


def _one_row(image: Path, mask: Path | str = "", label: int = 1) -> pd.DataFrame:
    return pd.DataFrame([{"dataset": "d", "category": "c", "split": "test", "image_path": str(image),
                          "mask_path": str(mask), "label": label, "defect_type": "x" if label else "good"}])


@pytest.mark.parametrize("layout", ["mvtec", "btad", "visa", "custom", "folder"])
def test_missing_root(tmp_path, layout):
    with pytest.raises(DataError, match=f"{tmp_path / 'absent'} does not exist"):
        index_dataset(layout, tmp_path / "absent", "widget")


def test_missing_category_lists_the_available_ones(mvtec):
    with pytest.raises(DataError, match=r"category 'bottle' not found: .*bottle does not exist.*: widget"):
        index_dataset("mvtec", mvtec, "bottle")


def test_unknown_layout(mvtec):
    with pytest.raises(DataError, match="unknown data set layout 'mvtek'.*mvtec"):
        index_dataset("mvtek", mvtec, "widget")


@pytest.mark.parametrize("name", ["..", "../widget", "/etc", "a/b", "a\\b", "."])
def test_names_escaping_the_root_are_rejected(mvtec, name):
    with pytest.raises(DataError, match="invalid category name"):
        index_dataset("mvtec", mvtec, name)
    with pytest.raises(DataError, match="invalid dataset name"):
        index_dataset("mvtec", mvtec, "widget", dataset=name)


def test_escaping_names_in_custom_visa_and_cache(tmp_path, mvtec):
    make_dataset("custom", tmp_path / "custom", size=16)
    with pytest.raises(DataError, match="invalid dataset folder name '..'"):
        index_dataset("custom", tmp_path / "custom", "widget", folder="..")
    visa = make_dataset("visa", tmp_path / "visa", size=16)
    csv = visa / "split_csv" / "1cls.csv"
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table.loc[0, "image"] = "../mvtec/widget/train/good/000.png"
    table.to_csv(csv, index=False)
    with pytest.raises(DataError, match="leaves the data root"):
        index_dataset("visa", visa, "widget")
    df = index_dataset("mvtec", mvtec, "widget").assign(dataset="../outside")
    with pytest.raises(DataError, match="invalid dataset name '../outside'"):
        ImageCache.build(df, tmp_path / "cache", 16)


def test_category_without_train_images(mvtec):
    for path in (mvtec / "widget" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"no training images found for category 'widget'.*put normal "
                                        r"images in .*widget/train/good"):
        index_dataset("mvtec", mvtec, "widget")


def test_one_sided_test_sets_are_allowed_with_a_warning(mvtec):
    good = mvtec / "widget" / "test" / "good"
    moved = mvtec.parent / "elsewhere"
    shutil.move(good, moved)
    with pytest.warns(DataWarning, match="test set has no normal images"):
        df = index_dataset("mvtec", mvtec, "widget")
    assert set(df.loc[df.split == "test", "label"]) == {1}
    shutil.move(moved, good)
    for defect in ("scratch", "blob", "missing", "stain"):
        shutil.rmtree(mvtec / "widget" / "test" / defect)
    with pytest.warns(DataWarning, match="test set has no anomalous images"):
        df = index_dataset("mvtec", mvtec, "widget")
    assert set(df.loc[df.split == "test", "label"]) == {0}


@pytest.mark.parametrize("cut", [0, 40, 200])
def test_corrupt_or_truncated_images_name_the_file(tmp_path, cut):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:cut] if cut else b"not an image at all")
    dataset = ImageDataset(_one_row(broken, label=0), img_size=16)  # indexing does not decode (fast)
    with pytest.raises(DataError, match=f"cannot decode image {broken}.*replace it with a good copy"):
        dataset[0]


def test_image_deleted_after_indexing(mvtec):
    df = index_dataset("mvtec", mvtec, "widget")
    Path(df["image_path"].iloc[0]).unlink()
    with pytest.raises(DataError, match="does not exist .*index the data set again"):
        ImageDataset(df, img_size=16)[0]


def test_unknown_extensions_are_ignored_with_a_warning(mvtec):
    train = mvtec / "widget" / "train" / "good"
    (train / "notes.txt").write_text("hello")
    (train / ".DS_Store").write_text("")  # hidden files: skipped silently
    shutil.copy(train / "000.png", train / "upper.PNG")  # extensions in any case are images
    with pytest.warns(DataWarning, match=r"ignored 1 file\(s\) in .*train/good .*notes.txt"):
        df = index_dataset("mvtec", mvtec, "widget")
    names = {Path(p).name for p in df["image_path"]}
    assert "upper.PNG" in names and "notes.txt" not in names


def test_mask_of_another_size_is_resized_with_a_warning(tmp_path):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    small = np.zeros((20, 20), np.uint8)
    small[:, 10:] = 255  # right half
    Image.fromarray(small).save(mask)
    with pytest.warns(DataWarning, match=f"mask {mask} is 20x20 but its image is 40x40; resizing"):
        item = ImageDataset(_one_row(image, mask), img_size=8)[0]
    assert item["mask"][0, :, 4:].eq(1).all() and item["mask"][0, :, :4].eq(0).all()


def test_defect_image_without_mask(mvtec):
    (mvtec / "widget" / "ground_truth" / "blob" / "001_mask.png").unlink()
    expected = mvtec / "widget" / "ground_truth" / "blob" / "001_mask.png"
    with pytest.raises(DataError, match=f"defective image .*blob/001.png has no mask: expected {expected}"):
        index_dataset("mvtec", mvtec, "widget")
    df = index_dataset("mvtec", mvtec, "widget", require_masks=False)
    row = df[df["image_path"].str.endswith("blob/001.png")].iloc[0]
    assert row["label"] == 1 and row["mask_path"] == ""


def test_btad_defect_without_mask(tmp_path):
    root = make_dataset("btad", tmp_path, categories=("01",), size=16)
    (root / "01" / "ground_truth" / "ko" / "0002.png").unlink()
    with pytest.raises(DataError, match=r"ko/0002.bmp has no mask: expected .*ground_truth/ko/0002.png"):
        index_dataset("btad", root, "01")


def test_all_zero_masks_are_legal(mvtec):
    mask = mvtec / "widget" / "ground_truth" / "stain" / "003_mask.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(mask)
    df = index_dataset("mvtec", mvtec, "widget")
    row = df.index[df["mask_path"] == str(mask)][0]
    item = ImageDataset(df, img_size=16)[row]
    assert item["label"] == 1 and item["mask"].sum() == 0


def test_visa_split_file_missing_or_listing_absent_files(tmp_path):
    root = make_dataset("visa", tmp_path, size=16)
    (root / "widget" / "Data" / "Images" / "Anomaly" / "002.JPG").unlink()
    with pytest.raises(DataError, match=r"lists .*Anomaly/002.JPG, which does not exist"):
        index_dataset("visa", root, "widget")
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"split_csv/1cls.csv does not exist; copy"):
        index_dataset("visa", root, "widget")


def test_folder_options_must_stay_inside(tmp_path):
    (tmp_path / "cat" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match="relative to .* without '..'"):
        index_dataset("folder", tmp_path, "cat", abnormal_dirs="../x")
    with pytest.raises(DataError, match=r"abnormal folder .*cat/abnormal does not exist"):
        index_dataset("folder", tmp_path, "cat")


def test_bad_manifest_files(tmp_path):
    with pytest.raises(DataError, match="manifest .* does not exist"):
        load_manifest(tmp_path / "none.parquet")
    _one_row(tmp_path / "x.png").drop(columns="label").to_parquet(tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"lacks columns \['label'\]"):
        load_manifest(tmp_path / "m.parquet")
