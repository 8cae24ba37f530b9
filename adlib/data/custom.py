"""The custom format of the original project (the "seed" format).

    <root>/<dataset>/data_rgb/normal/<name>          normal images
    <root>/<dataset>/data_rgb/<defect_type>/<name>   anomalous images, one folder per defect type

File names are ``{category} {freq} {dimming}[_{extra}].{ext}`` (space separated), e.g.
``pattern1 60 3_001.png``: ``category`` is a plain name, ``freq`` and ``dimming`` are numbers,
``extra`` is anything. The dataset folder is ``<root>/<folder>`` (``folder`` defaults to the
data set's name), or ``<root>`` itself when it holds ``data_rgb``. The indexer keeps
``<dataset>/data_info.csv`` (filename, category, freq, dimming, image_path, dataset_type,
defect_type, label) up to date: it is written when missing and rewritten when the images on
disk differ from the ones it lists. Normal images are split into
train/test by a seeded ``train_ratio``; every anomalous image is a test image. There are no masks.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from adlib.data.files import check_name, list_images, require_dir, subdirs
from adlib.data.manifest import NORMAL, DataError, DataWarning, check_category, make_manifest, manifest_row
from adlib.data.splits import split_normals

IMAGES = "data_rgb"
NORMAL_DIR = "normal"
INFO_FILE = "data_info.csv"
INFO_COLUMNS = ("filename", "category", "freq", "dimming", "image_path", "dataset_type", "defect_type", "label")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")
_CATEGORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_name(filename: str) -> dict | None:
    """Split ``{category} {freq} {dimming}[_{extra}].{ext}``; ``None`` when it does not match."""
    parts = Path(filename).stem.split(" ")
    if len(parts) != 3:
        return None
    category, freq, last = parts
    dimming = last.split("_", 1)[0]
    if not (_CATEGORY.match(category) and _NUMBER.match(freq) and _NUMBER.match(dimming)):
        return None
    return {"category": category, "freq": freq, "dimming": dimming}


def dataset_dir(root: str | os.PathLike, folder: str | None) -> Path:
    """The folder holding ``data_rgb``: ``root`` itself, or ``root/<folder>``."""
    root = require_dir(root, "custom data root", "point 'root' at the folder that holds <dataset>/data_rgb")
    if (root / IMAGES).is_dir():
        return root
    candidates = [name for name in subdirs(root) if (root / name / IMAGES).is_dir()]
    if folder is None:
        raise DataError(f"{root} has no {IMAGES} folder; name the dataset folder (folder=... or dataset=...). "
                        f"Dataset folders there: {', '.join(candidates) or 'none'}")
    path = root / check_name(folder, "dataset folder")
    if not (path / IMAGES).is_dir():
        raise DataError(f"custom dataset {path / IMAGES} does not exist; expected images in "
                        f"{path / IMAGES / NORMAL_DIR} and {path / IMAGES}/<defect_type>. "
                        f"Dataset folders under {root}: {', '.join(candidates) or 'none'}")
    return path


def scan(data_dir: Path) -> pd.DataFrame:
    """Build the data_info table from the images on disk; all bad file names in one error."""
    rows, invalid = [], []
    image_root = data_dir / IMAGES
    for folder in subdirs(image_root):
        label = 0 if folder == NORMAL_DIR else 1
        for path in list_images(image_root / folder):
            fields = parse_name(path.name)
            if fields is None:
                invalid.append(path)
                continue
            rows.append({"filename": path.name, **fields,
                         "image_path": path.relative_to(data_dir).as_posix(), "dataset_type": data_dir.name,
                         "defect_type": NORMAL if label == 0 else folder, "label": label})
    if invalid:
        shown = "\n  ".join(str(p) for p in invalid[:50]) + (f"\n  ... and {len(invalid) - 50} more"
                                                               if len(invalid) > 50 else "")
        raise DataError(f"{len(invalid)} file name(s) in {image_root} do not follow "
                        f"'{{category}} {{freq}} {{dimming}}[_{{extra}}].{{ext}}' (space separated, "
                        f"freq and dimming numbers, e.g. 'pattern1 60 3_001.png'); rename them:\n  {shown}")
    return pd.DataFrame(rows, columns=list(INFO_COLUMNS))


def load_info(data_dir: Path) -> pd.DataFrame:
    """``data_info.csv``, regenerated first when it is missing or lists other files than disk."""
    from adlib.io import write_text

    csv = data_dir / INFO_FILE
    current = scan(data_dir)
    if csv.is_file():
        stored = pd.read_csv(csv, dtype=str, keep_default_na=False)
        if tuple(stored.columns) == INFO_COLUMNS and set(stored["image_path"]) == set(current["image_path"]):
            return current
        reason = "stale (its file list differs from the images on disk)"
    else:
        reason = "missing"
    buffer = io.StringIO()
    current.to_csv(buffer, index=False)
    try:
        write_text(csv, buffer.getvalue())
    except OSError as exc:
        warnings.warn(f"{csv} is {reason} and cannot be written ({exc}); using the file list from disk",
                      DataWarning, stacklevel=2)
    return current


def list_categories(root: str | os.PathLike, dataset: str | None = None, folder: str | None = None) -> list[str]:
    return sorted(set(load_info(dataset_dir(root, folder or dataset))["category"]))


def index(root: str | os.PathLike, category: str, *, dataset: str | None = None, folder: str | None = None,
          train_ratio: float = 0.8, seed: int = 0) -> pd.DataFrame:
    """Index one category (the first token of the file names) of a custom dataset."""
    data_dir = dataset_dir(root, folder or dataset)
    check_name(category, "category")
    info = load_info(data_dir)
    info = info[info["category"] == category]
    if info.empty:
        raise DataError(f"category {category!r} not found in {data_dir / IMAGES}: no file name starts "
                        f"with '{category} '. Categories there: "
                        f"{', '.join(list_categories(data_dir)) or 'none'}")
    name = dataset or data_dir.name
    normals = [data_dir / p for p in info.loc[info["label"] == 0, "image_path"]]
    train, test = split_normals(normals, train_ratio, seed)
    rows = [manifest_row(name, category, "train", p, "", 0, NORMAL) for p in train]
    rows += [manifest_row(name, category, "test", p, "", 0, NORMAL) for p in test]
    for record in info[info["label"] == 1].itertuples(index=False):
        rows.append(manifest_row(name, category, "test", data_dir / record.image_path, "", 1, record.defect_type))
    return check_category(make_manifest(rows), f"category {category!r} of {data_dir}",
                          f"put normal images named '{category} <freq> <dimming>.png' in "
                          f"{data_dir / IMAGES / NORMAL_DIR}")
