"""Evaluate: score the test split with a trained run; write scores, maps, metrics, thresholds and pictures."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from adlib import artifacts, memory_probe
from adlib.io import read_json, write_json
from adlib.run.device import job_device
from adlib.run.loaders import image_loader, split_of
from adlib.run.pictures import write_pictures
from adlib.run.scoring import latency_ms_batch1, score_images
from adlib.settings import Settings

SCORE_COLUMNS = ["image_path", "category", "defect_type", "label", "split"]


def evaluate_run(run_dir: str | Path, manifest_path: str | Path, settings: Settings, *,
                 cache_root: str | Path | None = None, calibration: str = "test", progress: bool = True,
                 title: str | None = None, model_dir: str | Path | None = None) -> Path:
    """Score the test split of ``manifest_path`` with the model trained in ``model_dir`` (default
    ``run_dir``); write the results into ``run_dir``.

    Picture and results-text names carry ``title`` (default ``<dataset>_<category>_<model>``).
    ``calibration="calibration"`` also fits the thresholds on the manifest's calibration split
    and reports them applied to the test split ("transferred"), beside the oracle thresholds
    fitted on the test split itself. Images the model trained on (labelled configurations) are
    never scored.
    """
    from adlib.data import DataError, load_manifest
    from adlib.evaluation import build_metrics

    run_dir = Path(run_dir)
    model_dir = Path(model_dir) if model_dir is not None else run_dir
    device = job_device(settings)
    model, config = artifacts.load_model(model_dir, backbone_dir=settings.backbone_dir, device=device)
    manifest = load_manifest(Path(manifest_path))
    trained_on = set(_trained_on(model_dir))
    test_df = split_of(manifest, "test")
    excluded = int(test_df["image_path"].isin(trained_on).sum())
    test_df = test_df[~test_df["image_path"].isin(trained_on)].reset_index(drop=True)
    if test_df.empty:
        raise DataError(f"manifest {manifest_path} has no test images to evaluate")
    tcfg = config["train"]
    loader = image_loader(test_df, tcfg, cache_root, settings, shuffle=False)
    with memory_probe.stage("scoring"):
        test = score_images(model, loader, device, with_pixels=model.produces_maps, progress=progress)

    calib_scores = calib_labels = None
    calib_df = split_of(manifest, "calibration")
    if calibration == "calibration":
        if calib_df.empty:
            raise DataError(f"calibration='calibration' but manifest {manifest_path} has no calibration split; "
                            "prepare the data with a calibration_fraction > 0")
        calib = score_images(model, image_loader(calib_df, tcfg, cache_root, settings, shuffle=False),
                             device, with_pixels=False, progress=progress)
        calib_scores, calib_labels = calib.scores, calib_df["label"].to_numpy()

    labels = test_df["label"].to_numpy()
    with memory_probe.stage("metrics"):
        metrics: dict[str, Any] = build_metrics(labels, test.scores, test.pixel_metrics, calib_labels, calib_scores)
        metrics.update({"inference_ms_b1": latency_ms_batch1(model, loader.dataset, device),
                        "inference_ms_batch": test.ms_per_image, "batch_size": int(tcfg["batch_size"]),
                        "device": str(device), "produces_maps": bool(model.produces_maps)})
    if not model.produces_maps:
        metrics["notes"].append(f"produces_maps: {config['name']} scores whole images only (no anomaly maps)")
    if excluded:
        metrics["notes"].append(f"{excluded} anomalous test images were used for training (labelled "
                                "configuration) and are not evaluated")
    if model_dir.resolve() != run_dir.resolve():
        metrics["model_dir"] = os.path.relpath(model_dir, run_dir)  # relative: the results folder may move

    scores = test_df[SCORE_COLUMNS].copy()
    scores["score"] = test.scores
    if calib_scores is not None:
        extra = calib_df[SCORE_COLUMNS].copy()
        extra["score"] = calib_scores
        scores = pd.concat([scores, extra], ignore_index=True)
    artifacts.write_scores(run_dir / artifacts.SCORES, scores)
    if test.maps is not None:
        artifacts.write_maps(run_dir / artifacts.MAPS, test.maps, test_df["image_path"].to_numpy())
    write_json(run_dir / artifacts.METRICS, metrics)
    title = title or f"{config['dataset']}_{test_df['category'].iloc[0]}_{config['name']}"
    with memory_probe.stage("pictures"):
        write_pictures(run_dir, title, test_df, test, metrics, loader.dataset)
    return run_dir


def model_dir_of(run_dir: str | Path) -> Path:
    """Where the model of an evaluated run was trained (the run itself unless metrics.json says)."""
    run_dir = Path(run_dir)
    path = run_dir / artifacts.METRICS
    relative = read_json(path).get("model_dir") if path.is_file() else None
    return run_dir / relative if relative else run_dir


def _trained_on(model_dir: Path) -> list[str]:
    """Test images a labelled configuration moved into its training split (splits.json)."""
    path = model_dir / artifacts.SPLITS
    return list(read_json(path).get("labelled_train", [])) if path.is_file() else []
