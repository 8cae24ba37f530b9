"""What an ensemble reads from its members' finished runs: scores (test and calibration split)
and compact anomaly maps, aligned image by image.

An ensemble is fitted per *block*, one data set x category x seed, on the block's *fit split*:
the calibration split when every member scored normal and anomalous calibration images (nothing
is then chosen on the test split), else the test split (optimistic, and reported as such).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from adlib import artifacts

CALIBRATION = "calibration"
TEST = "test"
#: the block of a run: where its ensemble is fitted
BLOCK = ("dataset", "category", "seed")
#: which normal images the normalisation statistics come from, per fit split
REFERENCES = {CALIBRATION: "calibration normals", TEST: "test normals (optimistic: uses test labels)"}


def member_label(run_dir: str | Path) -> str:
    """A run's model label: the folder above the seed (``.../<model>/<seed>``), or the run
    folder itself when it has no seed level (``adlib train`` outputs ``.../<model>``)."""
    parts = Path(run_dir).resolve().parts
    return parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


@dataclasses.dataclass
class MemberRun:
    """One finished run as an ensemble member."""

    label: str
    run_dir: Path
    model_dir: Path  # where model.safetensors and config.json are (the run, or a dataset-scope folder)
    config: dict[str, Any]
    scores: pd.DataFrame  # scores.parquet, with ``model`` = label

    @classmethod
    def read(cls, run_dir: str | Path, label: str | None = None) -> "MemberRun":
        from adlib.reporting.runs import read_run_json
        from adlib.run.evaluate import model_dir_of

        run_dir = Path(run_dir)
        label = label or member_label(run_dir)
        path = run_dir / artifacts.SCORES
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {run_dir} is not an evaluated run (evaluate it first)")
        scores = pd.read_parquet(path)
        if "split" not in scores.columns:
            scores["split"] = TEST
        scores["model"] = label
        model_dir = model_dir_of(run_dir)
        return cls(label, run_dir, model_dir, read_run_json(model_dir, artifacts.CONFIG), scores)

    @property
    def produces_maps(self) -> bool:
        return (self.run_dir / artifacts.MAPS).is_file()

    @property
    def view(self) -> float:
        """The part of the (square-resized) image the maps cover: center_crop / img_size."""
        train = self.config.get("train", {})
        crop = train.get("center_crop")
        return 1.0 if not crop else float(crop) / float(train["img_size"])

    def maps(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(maps ``[n, h, w]`` float16, image paths) of one split, ``None`` when not stored."""
        return read_maps(self.run_dir, split)


def read_maps(run_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One split's maps from a run's maps.npz (calibration maps only in runs evaluated with a
    calibration split by adlib >= this version)."""
    path = Path(run_dir) / artifacts.MAPS
    if not path.is_file():
        return None
    prefix = "" if split == TEST else f"{split}_"
    with np.load(path, allow_pickle=False) as archive:
        if f"{prefix}maps" not in archive.files:
            return None
        return archive[f"{prefix}maps"], archive[f"{prefix}image_path"].astype(str)


@dataclasses.dataclass
class SplitScores:
    """The images of one split that every member scored, and each member's raw scores."""

    image_path: np.ndarray
    label: np.ndarray
    defect_type: np.ndarray
    raw: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.image_path)

    def normals(self, member: str) -> np.ndarray:
        return self.raw[member][self.label == 0]


@dataclasses.dataclass
class Block:
    """One data set x category x seed: test images, fit-split images, and which split that is."""

    key: dict[str, Any]
    members: list[str]
    test: SplitScores
    fit: SplitScores
    fit_split: str  # CALIBRATION, or TEST without calibration images of both classes (optimistic)

    @property
    def optimistic(self) -> bool:
        return self.fit_split == TEST

    def name(self) -> str:
        return "/".join(str(self.key[k]) for k in BLOCK)


def split_scores(frame: pd.DataFrame, members: Sequence[str], split: str) -> SplitScores:
    """Images of ``split`` scored by every member (long ``frame``: one row per model and image)."""
    rows = frame[(frame["split"] == split) & frame["model"].isin(members)]
    wide = rows.pivot_table(index="image_path", columns="model", values="score", aggfunc="first")
    wide = wide.reindex(columns=list(members)).dropna(axis=0, how="any").sort_index()
    first = rows.groupby("image_path").first().reindex(wide.index)
    defect = first["defect_type"] if "defect_type" in first else pd.Series("unknown", index=wide.index)
    return SplitScores(wide.index.to_numpy(str), first["label"].to_numpy(int), defect.astype(str).to_numpy(),
                       {m: wide[m].to_numpy(np.float64) for m in members})


def make_block(frame: pd.DataFrame, members: Sequence[str], key: Mapping[str, Any]) -> Block:
    """The block of ``members`` in the long score ``frame`` of one data set x category x seed."""
    members = list(members)
    test = split_scores(frame, members, TEST)
    calibration = split_scores(frame, members, CALIBRATION)
    usable = len(set(calibration.label.tolist())) == 2  # normal and anomalous calibration images
    return Block(dict(key), members, test, calibration if usable else test, CALIBRATION if usable else TEST)


def members_frame(members: Sequence[MemberRun]) -> pd.DataFrame:
    """The members' scores stacked (long format, ``model`` = label)."""
    return pd.concat([m.scores for m in members], ignore_index=True)


def check_same_images(members: Sequence[MemberRun]) -> None:
    """Members of one ensemble must have scored the same test and calibration images."""
    first = members[0]
    for split in (TEST, CALIBRATION):
        expected = set(first.scores.loc[first.scores["split"] == split, "image_path"])
        for other in members[1:]:
            found = set(other.scores.loc[other.scores["split"] == split, "image_path"])
            if found != expected:
                raise ValueError(f"members {first.label} ({first.run_dir}) and {other.label} ({other.run_dir}) "
                                 f"scored different {split} images ({len(expected ^ found)} differ): ensemble "
                                 "members must be runs on the same prepared data (same category, calibration "
                                 "fraction and data seed)")


@dataclasses.dataclass
class MemberMaps:
    """One member's compact maps of a block's test images (in the block's order) and of its
    reference normal images, and which images those are."""

    test: np.ndarray
    reference_normals: np.ndarray
    reference: str
    view: float  # the part of the image the maps cover (MemberRun.view)


def member_maps(run: MemberRun, block: Block) -> MemberMaps | None:
    """``run``'s maps for ``block``; ``None`` for image-level models. The reference normals are
    the fit split's normal images; runs evaluated before maps.npz held calibration maps fall back
    to the test normals (reported as optimistic). Tiled runs join at score level only: their maps
    keep each image's aspect ratio and do not align with square maps."""
    test = run.maps(TEST)
    if test is None or run.config.get("train", {}).get("tile_size"):
        return None
    test_maps = _in_order(*test, block.test.image_path, run)
    reference = run.maps(CALIBRATION) if block.fit_split == CALIBRATION else None
    if reference is not None:
        normals = block.fit.image_path[block.fit.label == 0]
        return MemberMaps(test_maps, _in_order(*reference, normals, run), REFERENCES[CALIBRATION], run.view)
    source = REFERENCES[TEST] if block.fit_split == TEST else "test normals (no calibration maps stored: optimistic)"
    return MemberMaps(test_maps, test_maps[block.test.label == 0], source, run.view)


def _in_order(maps: np.ndarray, paths: np.ndarray, wanted: np.ndarray, run: MemberRun) -> np.ndarray:
    index = {p: i for i, p in enumerate(paths)}
    missing = [p for p in wanted if p not in index]
    if missing:
        raise ValueError(f"{run.run_dir / artifacts.MAPS} has no map of {len(missing)} scored images (e.g. "
                         f"{missing[0]}); re-evaluate the run")
    return maps[[index[p] for p in wanted]]
