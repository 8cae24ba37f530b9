"""The files of one run directory: weights, configuration, provenance, fit report.

Every write goes through :mod:`adlib.io` (temporary name, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adlib import __version__
from adlib.io import atomic_path, read_json, write_json
from adlib.models.registry import ResolvedConfig, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PROVENANCE = "provenance.json"
FIT = "fit.json"
SCORES = "scores.parquet"
MAPS = "maps.npz"
METRICS = "metrics.json"
SPLITS = "splits.json"


def run_config(config: ResolvedConfig, *, dataset: str, category: str, seed: int, pretrained: bool,
               categories: list[str] | None = None) -> dict:
    """What config.json holds: the resolved model configuration plus the run's identity
    (``categories``: every category trained on; one unless the run covers a whole data set)."""
    return {**config.to_dict(), "dataset": dataset, "category": category, "categories": categories or [category],
            "seed": int(seed), "pretrained": bool(pretrained)}


def config_hash(config: dict) -> str:
    """Short stable hash of a run configuration (leaderboards group and compare by it)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, config: dict) -> None:
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(model.saved_state(), str(tmp), metadata={"adlib_model": config["name"]})
    write_json(run_dir / CONFIG, config)


def load_model(run_dir: str | os.PathLike, *, backbone_dir: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a saved model (frozen backbones come from ``backbone_dir`` again)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in (CONFIG, WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: {run_dir} is not a completed training run "
                                    "(train it first with `adlib train` or the workflow)")
    config = read_json(run_dir / CONFIG)
    model = build_model(ResolvedConfig.from_dict(config), pretrained=config.get("pretrained", True),
                        backbone_dir=backbone_dir)
    model.load_saved_state(load_file(str(run_dir / WEIGHTS)))
    return model.to(device).eval(), config


def write_scores(path: Path, frame) -> None:
    """scores.parquet, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_maps(path: Path, maps: np.ndarray, image_paths: np.ndarray, calibration_maps: np.ndarray | None = None,
               calibration_image_paths: np.ndarray | None = None) -> None:
    """maps.npz (``maps``, ``image_path`` of the test images, and ``calibration_maps``,
    ``calibration_image_path`` when given) deflated at level 1: 2.4x faster than
    ``np.savez_compressed``'s level 6 for 2% more bytes on float16 maps."""
    arrays = [("maps", maps), ("image_path", image_paths.astype(str))]
    if calibration_maps is not None:
        arrays += [("calibration_maps", calibration_maps),
                   ("calibration_image_path", np.asarray(calibration_image_paths).astype(str))]
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def git_commit() -> str | None:
    """The commit of the adlib source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: torch.device) -> dict[str, Any]:
    info = {"hostname": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def provenance(config: dict, *, device: torch.device, extra: dict | None = None) -> dict:
    import timm

    return {
        "adlib_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "seed": config["seed"],
        "device": str(device),
        **hardware(device),
        "random_backbone": not config.get("pretrained", True),
        "config_hash": config_hash(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
