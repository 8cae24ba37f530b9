"""The custom (seed) format: data_info.csv generation and refresh, file names, the normal split."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from adlib.data import DataError, DataWarning, index_dataset, list_categories
from adlib.data.custom import INFO_COLUMNS, parse_name
from adlib.data.synthetic import make_dataset


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    make_dataset("custom", tmp_path, categories=("pattern1", "pattern2"), n_train=6, n_test_good=4,
                 n_test_bad=4, size=16)
    return tmp_path / "synthetic"


def test_parse_name():
    assert parse_name("pattern1 60 3_001.png") == {"category": "pattern1", "freq": "60", "dimming": "3"}
    assert parse_name("p 1.5 -2.JPG") == {"category": "p", "freq": "1.5", "dimming": "-2"}
    for bad in ("pattern1_60_3.png", "pattern1 60.png", "pattern1 sixty 3.png", "a b c d.png", " 60 3.png"):
        assert parse_name(bad) is None, bad


def test_data_info_is_generated(data_dir):
    csv = data_dir / "data_info.csv"
    assert not csv.exists()
    df = index_dataset("custom", data_dir, "pattern1", train_ratio=0.6)
    info = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert tuple(info.columns) == INFO_COLUMNS
    assert len(info) == 2 * (6 + 4 + 4)
    assert set(info["dataset_type"]) == {"synthetic"}
    row = info[info["filename"] == "pattern1 60 1_000.png"].iloc[0]
    assert (row["category"], row["freq"], row["dimming"], row["label"], row["defect_type"]) == \
        ("pattern1", "60", "1", "0", "good")
    assert row["image_path"] == "data_rgb/normal/pattern1 60 1_000.png"  # relative: the folder can move
    assert set(info.loc[info["label"] == "1", "defect_type"]) == {"scratch", "blob", "missing", "stain"}
    assert (df["split"] == "train").sum() == 6 and (df["split"] == "test").sum() == 8
    assert list_categories("custom", data_dir) == ["pattern1", "pattern2"]


def test_data_info_is_kept_when_current_and_rewritten_when_stale(data_dir):
    csv = data_dir / "data_info.csv"
    index_dataset("custom", data_dir, "all")
    stamp = csv.stat().st_mtime_ns
    index_dataset("custom", data_dir, "all")
    assert csv.stat().st_mtime_ns == stamp
    normal = data_dir / "data_rgb" / "normal"
    shutil.copy(normal / "pattern1 60 1_000.png", normal / "pattern3 50 2.png")  # a new category
    (data_dir / "data_rgb" / "blob" / "pattern1 120 2_001.png").unlink()
    with pytest.warns(DataWarning, match="category 'pattern3' .* no test images"):
        df = index_dataset("custom", data_dir, "all")
    info = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert "data_rgb/normal/pattern3 50 2.png" in set(info["image_path"])
    assert "data_rgb/blob/pattern1 120 2_001.png" not in set(info["image_path"])
    assert set(df["category"]) == {"pattern1", "pattern2", "pattern3"}
    assert (df.loc[df["category"] == "pattern1", "label"] == 1).sum() == 3


def test_normal_split_is_seeded_and_sized(data_dir):
    a = index_dataset("custom", data_dir, "pattern1", train_ratio=0.5, seed=0)
    b = index_dataset("custom", data_dir, "pattern1", train_ratio=0.5, seed=0)
    c = index_dataset("custom", data_dir, "pattern1", train_ratio=0.5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert (a["split"] == "train").sum() == 5
    assert set(a.loc[a.split == "train", "image_path"]) != set(c.loc[c.split == "train", "image_path"])
    assert (a.loc[a["label"] == 1, "split"] == "test").all()


def test_invalid_file_names_are_reported_together(data_dir):
    normal = data_dir / "data_rgb" / "normal"
    for name in ("bad_name.png", "pattern1 x 2.png", "pattern1  60 2.png"):
        shutil.copy(normal / "pattern1 60 1_000.png", normal / name)
    with pytest.raises(DataError) as error:
        index_dataset("custom", data_dir, "pattern1")
    message = str(error.value)
    assert message.startswith("3 file name(s)")
    assert all(name in message for name in ("bad_name.png", "pattern1 x 2.png", "pattern1  60 2.png"))
    assert "{category} {freq} {dimming}" in message
    assert not (data_dir / "data_info.csv").exists()


def test_missing_dataset_folder_and_category(data_dir):
    with pytest.raises(DataError, match="name the dataset folder"):
        index_dataset("custom", data_dir.parent, "pattern1")
    with pytest.raises(DataError, match=r"other/data_rgb does not exist.*synthetic"):
        index_dataset("custom", data_dir.parent, "pattern1", dataset="other")
    with pytest.raises(DataError, match=r"category 'nope' not found.*pattern1, pattern2"):
        index_dataset("custom", data_dir, "nope")
    assert len(index_dataset("custom", data_dir.parent, "pattern1", dataset="synthetic")) == 14
