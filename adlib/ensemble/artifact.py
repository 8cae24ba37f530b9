"""The ensemble artifact: a directory that ``adlib predict`` loads like a single run.

    ENSEMBLE_DIR/ensemble.json

``ensemble.json`` holds the block it was fitted on (data set, category, seed), every member
run (label, folders relative to the ensemble directory and absolute, its *content hash*:
SHA-256 over the SHA-256 of its ``model.safetensors`` and ``config.json``), and the fitted
ensemble (:class:`~adlib.ensemble.fitted.FittedEnsemble`: normalisation statistics of scores
and maps, fusion rule and weights, thresholds and pixel threshold fitted on the fit split, which
split that was). Member weights are referenced, not copied; loading checks every member
against its recorded hashes and refuses with a clear error when one is missing or changed. The
directory is written atomically (built under a temporary name, then renamed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from adlib import __version__, artifacts
from adlib.ensemble.fitted import FittedEnsemble, fit_ensemble, fit_maps
from adlib.ensemble.runs import (MemberRun, check_same_images, make_block, member_maps, members_frame)
from adlib.io import read_json, sha256_file, staged_directory, write_json

FORMAT = "adlib-ensemble"
VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
#: the files whose content names a member run
HASHED_FILES = (artifacts.WEIGHTS, artifacts.CONFIG)

log = logging.getLogger(__name__)


class EnsembleError(ValueError):
    """An ensemble directory is unusable: not an ensemble, or a member run is missing or changed."""


def member_hashes(model_dir: Path) -> dict[str, str]:
    """SHA-256 of each file that names a member run (missing files are an error)."""
    missing = [name for name in HASHED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}: it is not a completed training run")
    return {name: sha256_file(model_dir / name) for name in HASHED_FILES}


def content_hash(files: dict[str, str]) -> str:
    """One hash over a member's file hashes."""
    return hashlib.sha256("".join(f"{name}:{files[name]}\n" for name in sorted(files)).encode()).hexdigest()


@dataclasses.dataclass
class Member:
    """A member run as recorded in ensemble.json, resolved on this machine."""

    label: str
    model_dir: Path
    content_hash: str
    produces_maps: bool
    record: dict[str, Any]


@dataclasses.dataclass
class EnsembleArtifact:
    directory: Path
    block: dict[str, Any]
    members: list[Member]
    fitted: FittedEnsemble
    record: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# build
def build_ensemble(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   normalization: str = "zscore", fusion: str = "mean", labels: Sequence[str] | None = None) -> Path:
    """Fit an ensemble of the evaluated runs ``run_dirs`` (one category, same prepared data) on
    their calibration split and write it to ``out_dir`` (replaced atomically)."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run or none")
    members = [MemberRun.read(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    names = [m.label for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"member labels must differ, got {names}; runs of the same model need their own labels")
    if not members:
        raise ValueError("an ensemble needs at least one member run")
    check_same_images(members)
    first = members[0]
    key = {"dataset": first.config.get("dataset"), "category": str(first.scores["category"].iloc[0]),
           "seed": first.config.get("seed")}
    block = make_block(members_frame(members), names, key)
    fitted = fit_ensemble(block, names, normalization, fusion)
    fit_maps(fitted, {m.label: maps for m in members if (maps := member_maps(m, block)) is not None})
    if block.optimistic:
        fitted.notes.append("fitted on the test split (no calibration split with normal and anomalous images): "
                            "its thresholds and statistics are optimistic")
        log.warning("ensemble %s: no calibration split, fitted on the test split (optimistic)", out_dir)
    out_dir = Path(out_dir)
    record = {"format": FORMAT, "version": VERSION, "adlib_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "block": key,
              "members": [_member_record(m, out_dir) for m in members], "fitted": fitted.to_dict()}
    with staged_directory(out_dir) as tmp:
        write_json(tmp / ENSEMBLE_FILE, record)
    return out_dir


def _member_record(member: MemberRun, out_dir: Path) -> dict[str, Any]:
    files = member_hashes(member.model_dir)
    train = member.config.get("train", {})
    return {"label": member.label, "model_name": member.config.get("name"),
            "model_dir": str(member.model_dir.resolve()),
            "model_dir_relative": os.path.relpath(member.model_dir.resolve(), out_dir.resolve()),
            "run_dir": str(member.run_dir.resolve()), "content_hash": content_hash(files), "files": files,
            "produces_maps": member.produces_maps, "img_size": train.get("img_size"),
            "center_crop": train.get("center_crop")}


# ----------------------------------------------------------------------------------------------
# load
def is_ensemble_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def load_ensemble(directory: str | os.PathLike) -> EnsembleArtifact:
    """Read an ensemble directory and check every member against its recorded hashes."""
    directory = Path(directory)
    path = directory / ENSEMBLE_FILE
    if not path.is_file():
        raise EnsembleError(f"{directory} is not an ensemble directory ({ENSEMBLE_FILE} is missing); build one "
                            "with `adlib ensemble build`")
    record = read_json(path)
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise EnsembleError(f"{path} is not an {FORMAT} file of version {VERSION} (found format "
                            f"{record.get('format')!r}, version {record.get('version')!r}); rebuild it")
    members = [_verified_member(entry, directory) for entry in record["members"]]
    return EnsembleArtifact(directory, record["block"], members, FittedEnsemble.from_dict(record["fitted"]), record)


def _verified_member(entry: dict[str, Any], directory: Path) -> Member:
    label = entry["label"]
    candidates = [directory / entry["model_dir_relative"], Path(entry["model_dir"])]
    found = next((d for d in candidates if all((d / name).is_file() for name in HASHED_FILES)), None)
    rebuild = "rebuild the ensemble with `adlib ensemble build` (or restore the run)"
    if found is None:
        raise EnsembleError(f"member run {label!r} of the ensemble in {directory} is missing: no "
                            f"{' and '.join(HASHED_FILES)} in {candidates[0].resolve()} or {candidates[1]}; {rebuild}")
    files = {name: sha256_file(found / name) for name in HASHED_FILES}
    changed = [name for name in HASHED_FILES if files[name] != entry["files"][name]]
    if changed:
        raise EnsembleError(f"member run {label!r} ({found}) changed since the ensemble was built: "
                            f"{', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from the recorded "
                            f"content hash {entry['content_hash'][:12]}; {rebuild}")
    return Member(label, found, entry["content_hash"], bool(entry["produces_maps"]), entry)


# ----------------------------------------------------------------------------------------------
# the workflow's recommended ensembles
def build_recommended(recommendation: str | os.PathLike, run_dirs: Sequence[str | os.PathLike],
                      out_root: str | os.PathLike) -> Path:
    """The report's recommended ensemble for every data set x category x seed of ``run_dirs``
    (workflow layout), in ``<out_root>/<dataset>/<category>/<seed>/``; ``index.json`` lists
    them and the blocks skipped (a member without a run there). Replaces ``out_root`` atomically."""
    from adlib.reporting.runs import run_identity

    rec = read_json(recommendation)
    blocks: dict[tuple, dict[str, str]] = {}
    for run_dir in run_dirs:
        ident = run_identity(run_dir)
        blocks.setdefault((ident["dataset"], ident["category"], ident["seed"]), {})[ident["model"]] = str(run_dir)
    index: dict[str, Any] = {"recommendation": {k: rec.get(k) for k in ("members", "normalization", "fusion")},
                             "ensembles": [], "skipped": []}
    with staged_directory(out_root) as tmp:
        for (dataset, category, seed), runs in sorted(blocks.items()):
            name = f"{dataset}/{category}/{seed}"
            missing = [m for m in rec.get("members") or [] if m not in runs]
            if not rec.get("members") or missing:
                reason = f"no run of {', '.join(missing)}" if missing else "the report recommends no ensemble"
                index["skipped"].append({"block": name, "reason": reason})
                continue
            build_ensemble([runs[m] for m in rec["members"]], tmp / name, normalization=rec["normalization"],
                           fusion=rec["fusion"], labels=rec["members"])
            index["ensembles"].append({"block": name, "directory": name})
        write_json(tmp / "index.json", index)
    return Path(out_root)
