"""Predict: score new images with a finished run; write scores, decisions and overlays."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from adlib import artifacts
from adlib.evaluation.thresholds import MODEL_METHODS
from adlib.io import atomic_path, read_json
from adlib.run.device import job_device
from adlib.run.evaluate import model_dir_of
from adlib.run.loaders import scoring_loader
from adlib.run.pictures import overlay_inputs, picture_name
from adlib.run.scoring import score_images
from adlib.settings import Settings


def collect_images(paths: list[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the given folders."""
    from adlib.data.files import IMAGE_EXTENSIONS, is_image

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if is_image(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist (give image files or folders of images)")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in "
                                f"{', '.join(map(str, paths))}")
    return found


def decision_threshold(metrics: dict, method: str) -> float:
    """A run's threshold for ``method``: transferred (calibration) when available, else oracle."""
    from adlib.evaluation.thresholds import deployed_threshold

    found = deployed_threshold(metrics, (method,))
    if found is None:
        raise ValueError(f"the run has no usable {method!r} threshold (see its metrics.json notes); "
                         "choose another --threshold-method, e.g. percentile_95")
    return found[2]


def prediction_loader(paths: list[Path], config: dict, settings: Settings, device: torch.device):
    """New images in a loader at a run's input size, tiled as the run was (labels are unknown:
    0 is a placeholder the scoring never reads)."""
    from adlib.data.manifest import make_manifest, manifest_row

    manifest = make_manifest(manifest_row("predict", config["category"], "test", p, "", 0, "unknown") for p in paths)
    return scoring_loader(manifest, config["train"], None, settings, device)


def predict_images(run_dir: str | Path, images: list[str | Path], settings: Settings, *, out_csv: str | Path,
                   threshold_method: str = "f1_percentile", overlay_dir: str | Path | None = None) -> pd.DataFrame:
    """Score new images with a saved run; write a CSV of scores and decisions (and overlays)."""
    from adlib.evaluation.plots import plot_overlay

    run_dir = Path(run_dir)
    if not (run_dir / artifacts.METRICS).is_file():
        raise artifacts.RunStateError(f"{run_dir} has no {artifacts.METRICS}: the run was not evaluated, so it has no "
                                      "thresholds; evaluate it first (`adlib evaluate` or the workflow)")
    metrics = read_json(run_dir / artifacts.METRICS)
    model_dir = model_dir_of(run_dir)
    artifacts.check_evaluated(run_dir, model_dir, metrics)
    device = job_device(settings)
    model, config = artifacts.load_model(model_dir, backbone_dir=settings.backbone_dir, device=device)
    own_rule = threshold_method in MODEL_METHODS  # the model's own rule: decision >= 0, nothing fitted
    if own_rule and model.decision_method != threshold_method:
        raise ValueError(f"{config['name']} has no {threshold_method!r} decision rule (only U-Flow has 'nfa'); "
                         "choose another --threshold-method, e.g. percentile_95")
    threshold = 0.0 if own_rule else decision_threshold(metrics, threshold_method)
    loader = prediction_loader(collect_images(images), config, settings, device)
    dataset = loader.dataset
    scored = score_images(model, loader, device, with_pixels=False, keep_maps=overlay_dir is not None,
                          progress=False)
    statistic = scored.decision if own_rule else scored.scores
    table = pd.DataFrame({"image_path": dataset.manifest["image_path"], "score": scored.scores,
                          "threshold": threshold, "threshold_method": threshold_method,
                          "anomalous": statistic >= threshold})
    if own_rule:
        table.insert(2, "decision", scored.decision)
    with atomic_path(Path(out_csv)) as tmp:
        table.to_csv(tmp, index=False)
    if overlay_dir is not None and scored.maps is not None:
        for index in range(len(dataset)):
            image, amap, _ = overlay_inputs(dataset, index, scored.maps[index])
            plot_overlay(image, None, amap, None, Path(overlay_dir) / picture_name(dataset, index),
                         f"score={scored.scores[index]:.3g} threshold={threshold:.3g}")
    return table
