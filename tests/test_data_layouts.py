"""Every layout indexed on synthetic data; the Dataset; manifests; aux sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adlib.data import (MANIFEST_COLUMNS, DataError, ImageDataset, index_dataset, index_many,
                        list_categories, load_manifest, resolve_imagenet_dir, resolve_texture_dir,
                        save_manifest, synthetic)
from adlib.data.synthetic import DEFECTS, make_dataset, make_imagenet_like, make_textures

CATS = ("widget", "gadget")
COUNTS = dict(n_train=6, n_test_good=3, n_test_bad=4, size=32)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {layout: make_dataset(layout, base / layout, categories=CATS, **COUNTS)
            for layout in ("mvtec", "visa", "btad", "custom")}


def _check_manifest(df: pd.DataFrame, dataset: str, n_train: int = 6) -> None:
    assert tuple(df.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert set(df["category"]) == set(CATS)
    assert (df["dataset"] == dataset).all()
    assert df["label"].dtype == np.int64
    for _, group in df.groupby("category"):
        assert (group["split"] == "train").sum() == n_train
        assert (group.loc[group["split"] == "train", "label"] == 0).all()
        assert (group["label"] == 1).sum() == 4
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["image_path"])
    assert ((df["defect_type"] == "good") == (df["label"] == 0)).all()


@pytest.mark.parametrize("layout", ["mvtec", "btad", "visa"])
def test_layouts_with_masks(roots, layout):
    df = index_dataset(layout, roots[layout], "all")
    _check_manifest(df, layout)
    anomalies = df[df["label"] == 1]
    assert all(Path(m).is_file() for m in anomalies["mask_path"])
    assert (df.loc[df["label"] == 0, "mask_path"] == "").all()
    assert list_categories(layout, roots[layout]) == sorted(CATS)


def test_mvtec_defect_types(roots):
    df = index_dataset("mvtec", roots["mvtec"], "widget")
    assert sorted(set(df.loc[df["label"] == 1, "defect_type"])) == sorted(DEFECTS)
    assert (df.loc[df["split"] == "test", "label"] == 0).sum() == 3


def test_custom_layout(roots):
    df = index_dataset("custom", roots["custom"], "all", dataset="synthetic", train_ratio=6 / 9)
    _check_manifest(df, "synthetic")
    assert (df["mask_path"] == "").all()
    # the dataset folder itself works as root too
    same = index_dataset("custom", roots["custom"] / "synthetic", "all", train_ratio=6 / 9)
    pd.testing.assert_frame_equal(df, same)


def test_folder_layout(tmp_path):
    for category in CATS:
        for kind, count in (("train", 5), ("good", 3)):
            for i in range(count):
                image, _ = synthetic.sample(category, kind, i, 32)
                Image.fromarray(image).save(_mkdir(tmp_path / category / "ok") / f"{kind}{i}.png")
        for i, defect in enumerate(DEFECTS):
            image, mask = synthetic.sample(category, defect, i, 32)
            Image.fromarray(image).save(_mkdir(tmp_path / category / "bad" / defect) / f"{i}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(_mkdir(tmp_path / category / "masks") / f"{i}_mask.png")
    dirs = [f"bad/{d}" for d in DEFECTS]
    df = index_dataset("folder", tmp_path, "all", normal_dirs="ok", abnormal_dirs=dirs, mask_dir="masks",
                       train_ratio=0.75)
    _check_manifest(df, "folder")
    assert sorted(set(df["defect_type"])) == sorted(("good",) + DEFECTS)
    assert all(Path(m).name == f"{Path(p).stem}_mask.png"
               for p, m in zip(df.loc[df.label == 1, "image_path"], df.loc[df.label == 1, "mask_path"]))
    # the seeded split is reproducible and changes with the seed
    again = index_dataset("folder", tmp_path, "all", normal_dirs="ok", abnormal_dirs=dirs, mask_dir="masks",
                          train_ratio=0.75)
    other = index_dataset("folder", tmp_path, "all", normal_dirs="ok", abnormal_dirs=dirs, mask_dir="masks",
                          train_ratio=0.75, seed=5)
    pd.testing.assert_frame_equal(df, again)
    assert set(df.loc[df.split == "train", "image_path"]) != set(other.loc[other.split == "train", "image_path"])


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_synthetic_layout_generates_once(tmp_path):
    df = index_dataset("synthetic", tmp_path, "widget", n_train=4, n_test_good=2, n_test_bad=4, size=32)
    assert (df["split"] == "train").sum() == 4 and (df["label"] == 1).sum() == 4
    first = Path(df["image_path"][0]).stat().st_mtime_ns
    again = index_dataset("synthetic", tmp_path, "widget", n_train=4, n_test_good=2, n_test_bad=4, size=32)
    pd.testing.assert_frame_equal(df, again)
    assert Path(df["image_path"][0]).stat().st_mtime_ns == first  # not rewritten
    assert list_categories("synthetic", tmp_path) == ["widget"]


def test_several_categories_and_data_sets(roots):
    one = index_dataset("mvtec", roots["mvtec"], ["gadget"])
    assert set(one["category"]) == {"gadget"}
    df = index_many([
        {"name": "a", "layout": "mvtec", "root": str(roots["mvtec"])},
        {"name": "b", "layout": "btad", "root": str(roots["btad"]), "categories": ["widget"]},
        {"name": "c", "layout": "custom", "root": str(roots["custom"]),
         "options": {"folder": "synthetic", "train_ratio": 0.5}},
    ])
    assert df.groupby("dataset")["category"].nunique().to_dict() == {"a": 2, "b": 1, "c": 2}
    with pytest.raises(DataError, match="used twice"):
        index_many([{"name": "a", "layout": "mvtec", "root": str(roots["mvtec"])}] * 2)


def test_calibration_split_is_stratified_and_seeded(roots):
    df = index_dataset("mvtec", roots["mvtec"], "all", calibration_fraction=0.3, seed=1)
    for _, group in df.groupby("category"):
        calibration, test = group[group.split == "calibration"], group[group.split == "test"]
        assert set(calibration["label"]) == {0, 1} and set(test["label"]) == {0, 1}
        assert (group.split == "train").sum() == 6
    again = index_dataset("mvtec", roots["mvtec"], "all", calibration_fraction=0.3, seed=1)
    pd.testing.assert_frame_equal(df, again)
    draws = {tuple(index_dataset("mvtec", roots["mvtec"], "widget", calibration_fraction=0.3, seed=s)
                   .query("split == 'calibration'")["image_path"]) for s in range(6)}
    assert len(draws) > 1


def test_manifest_round_trip(roots, tmp_path):
    df = index_dataset("visa", roots["visa"], "all", calibration_fraction=0.25)
    path = save_manifest(df, tmp_path / "sub" / "manifest.parquet")
    pd.testing.assert_frame_equal(load_manifest(path), df, check_dtype=False)
    assert load_manifest(path)["label"].dtype == np.int64


def test_dataset_items(roots):
    df = index_dataset("mvtec", roots["mvtec"], "widget")
    dataset = ImageDataset(df, img_size=48)
    item = dataset[len(df) - 1]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 48, 48) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["label"] == 1 and item["path"] == df["image_path"].iloc[-1] and item["index"] == len(df) - 1
    assert dataset[0]["mask"].sum() == 0
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["label"].tolist() == [0, 0, 0, 0]
    cropped = ImageDataset(df, img_size=40, center_crop=32, normalize=True)[0]["image"]
    assert cropped.shape == (3, 32, 32) and cropped.min() < 0
    custom = ImageDataset(df, img_size=32, normalize=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))[0]["image"]
    assert torch.allclose(custom, ImageDataset(df, img_size=32)[0]["image"] * 2 - 1, atol=1e-6)


def test_dataset_masks_are_exact_and_grayscale_becomes_rgb(roots, tmp_path):
    df = index_dataset("visa", roots["visa"], "widget")  # VisA masks hold class ids 1..4
    row = df[df.label == 1].iloc[0]
    item = ImageDataset(df, img_size=32)[int(row.name)]
    source = np.asarray(Image.open(row.mask_path)) > 0
    assert np.array_equal(item["mask"][0].numpy() > 0, source)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 30), 200, np.uint8)).save(gray)
    single = pd.DataFrame([{"dataset": "d", "category": "c", "split": "test", "image_path": str(gray),
                            "mask_path": "", "label": 0, "defect_type": "good"}])
    image = ImageDataset(single, img_size=16)[0]["image"]
    assert image.shape == (3, 16, 16) and torch.allclose(image, torch.full_like(image, 200 / 255))


def test_synthetic_data_is_deterministic_and_defects_are_visible(tmp_path):
    a = make_dataset("mvtec", tmp_path / "a", categories=("widget",), size=32)
    b = make_dataset("mvtec", tmp_path / "b", categories=("widget",), size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    mean = np.mean([synthetic.sample("widget", "train", i, 64)[0] for i in range(8)], axis=0)
    for i, defect in enumerate(DEFECTS):
        image, mask = synthetic.sample("widget", defect, i, 64)
        assert mask.sum() > 10
        change = np.abs(image.astype(float) - mean).mean(-1)
        assert change[mask].mean() > 3 * change[~mask].mean(), defect


def test_aux_sets(tmp_path):
    textures = make_textures(tmp_path, n=4, size=32)
    imagenet = make_imagenet_like(tmp_path, n=4, size=32)
    assert resolve_texture_dir(tmp_path) == textures
    assert resolve_texture_dir(tmp_path / "dtd") == textures
    assert resolve_imagenet_dir(tmp_path) == imagenet
    assert len(list(textures.rglob("*.jpg"))) == 4 and len(list(imagenet.rglob("*.JPEG"))) == 4
    with pytest.raises(DataError, match=r"dtd/images/banded") as error:
        resolve_texture_dir(tmp_path / "nothing")
    assert "nothing" in str(error.value)
    with pytest.raises(DataError, match=r"imagenette2/train"):
        resolve_imagenet_dir(tmp_path / "nothing")
