"""VisA raw layout, split by the official ``split_csv/1cls.csv``.

    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png       (any value > 0 is a defect)
    <root>/split_csv/1cls.csv                        (object, split, label, image, mask;
                                                      paths relative to <root>)
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from adlib.data.files import check_name, require_dir
from adlib.data.manifest import NORMAL, DataError, check_category, make_manifest, manifest_row

ROOT_HINT = "point 'root' at the VisA folder that holds split_csv/1cls.csv and one folder per category"
SPLIT_CSV = Path("split_csv") / "1cls.csv"
ANOMALY = "anomaly"  # VisA's split file has no defect names: every anomaly gets this type


def read_split(root: str | os.PathLike) -> pd.DataFrame:
    """The split table, checked for its columns."""
    root = require_dir(root, "VisA data root", ROOT_HINT)
    csv = root / SPLIT_CSV
    if not csv.is_file():
        raise DataError(f"VisA split file {csv} does not exist; copy split_csv/1cls.csv from the "
                        "VisA release (github.com/amazon-science/spot-diff) into the data root")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = {"object", "split", "label", "image", "mask"} - set(table.columns)
    if missing:
        raise DataError(f"{csv} lacks columns {sorted(missing)}; expected object, split, label, image, mask")
    return table


def list_categories(root: str | os.PathLike) -> list[str]:
    return sorted(set(read_split(root)["object"]))


def index(root: str | os.PathLike, category: str, *, dataset: str | None = None) -> pd.DataFrame:
    """Index one VisA category from the split file; every listed file must exist."""
    root = require_dir(root, "VisA data root", ROOT_HINT)
    table = read_split(root)
    check_name(category, "category")
    rows_in = table[table["object"] == category]
    if rows_in.empty:
        raise DataError(f"category {category!r} is not in {root / SPLIT_CSV}; categories there: "
                        f"{', '.join(sorted(set(table['object'])))}")
    dataset = dataset or "visa"
    rows = []
    for record in rows_in.itertuples(index=False):
        split = record.split.strip().lower()
        if split not in {"train", "test"}:
            raise DataError(f"{root / SPLIT_CSV}: split {record.split!r} for {record.image} is not train/test")
        label = 0 if record.label.strip().lower() == "normal" else 1
        image = _inside(root, record.image)
        mask = _inside(root, record.mask) if label == 1 and record.mask.strip() else ""
        if label == 1 and not mask:
            raise DataError(f"{root / SPLIT_CSV}: anomalous image {image} has no mask entry; add the "
                            "mask path to the split file")
        rows.append(manifest_row(dataset, category, split, image, mask, label, ANOMALY if label else NORMAL))
    return check_category(make_manifest(rows), f"category {category!r} of {root}",
                          f"{root / SPLIT_CSV} lists no train rows for {category!r}")


def _inside(root: Path, relative: str) -> Path:
    """``root/relative`` after checking it stays inside ``root`` and exists."""
    relative = relative.strip()
    path = Path(os.path.normpath(root / relative))
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise DataError(f"{root / SPLIT_CSV}: path {relative!r} leaves the data root; paths must be "
                        "relative to the VisA root")
    if not path.is_file():
        raise DataError(f"{root / SPLIT_CSV} lists {path}, which does not exist; restore the file "
                        "or use the split file that matches your copy of VisA")
    return path
