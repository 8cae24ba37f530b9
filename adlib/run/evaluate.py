"""Evaluate: score the test split with a trained run; write scores, maps, metrics, thresholds and pictures."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from adlib import artifacts, memory_probe
from adlib.io import (check_writable, dir_mode, publish_staged, read_json, remove_stale_temporaries,
                      temporary_name, write_json)
from adlib.run.device import job_device
from adlib.run.loaders import scoring_loader, split_of
from adlib.run.pictures import write_pictures
from adlib.run.scoring import latency_ms_batch1, score_images, timing_conditions
from adlib.settings import Settings

SCORE_COLUMNS = ["image_path", "category", "defect_type", "label", "split"]
log = logging.getLogger(__name__)


def evaluate_run(run_dir: str | Path, manifest_path: str | Path, settings: Settings, *,
                 cache_root: str | Path | None = None, calibration: str = "test", progress: bool = True,
                 title: str | None = None, model_dir: str | Path | None = None,
                 allow_other_data: bool = False) -> Path:
    """Score the test split of ``manifest_path`` with the model trained in ``model_dir`` (default
    ``run_dir``); write the results into ``run_dir``.

    Picture and results-text names carry ``title`` (default ``<dataset>_<category>_<model>``).
    ``calibration="calibration"`` also fits the thresholds on the manifest's calibration split
    and reports them applied to the test split ("transferred"), beside the oracle thresholds
    fitted on the test split itself. Images the model trained on (labelled configurations) are
    never scored. A manifest of another data set or category than the model was trained on is
    refused unless ``allow_other_data`` (then metrics.json records it as ``evaluated_on``).
    """
    from adlib.data import DataError, load_manifest
    from adlib.evaluation import build_metrics
    from adlib.evaluation.summary import metrics_by_defect_type

    run_dir = Path(run_dir)
    model_dir = Path(model_dir) if model_dir is not None else run_dir
    record = artifacts.trained_record(model_dir)
    check_writable(run_dir)
    remove_stale_temporaries(run_dir)
    device = job_device(settings)
    model, config = artifacts.load_model(model_dir, backbone_dir=settings.backbone_dir, device=device)
    manifest = load_manifest(Path(manifest_path))
    other_data = _other_data(manifest, config, manifest_path, model_dir, allow_other_data)
    trained_on = set(_trained_on(model_dir))
    test_df = split_of(manifest, "test")
    excluded = int(test_df["image_path"].isin(trained_on).sum())
    test_df = test_df[~test_df["image_path"].isin(trained_on)].reset_index(drop=True)
    if test_df.empty:
        raise DataError(f"manifest {manifest_path} has no test images to evaluate")
    tcfg = config["train"]
    loader = scoring_loader(test_df, tcfg, cache_root, settings, device)
    with memory_probe.stage("scoring"):
        test = score_images(model, loader, device, with_pixels=model.produces_maps, progress=progress,
                            defect_types=test_df["defect_type"].astype(str).tolist())

    calib = calib_scores = calib_labels = None
    reference = (None, "test normal images")  # normal maps the overlays' colour scale comes from
    calib_df = split_of(manifest, "calibration")
    if calibration == "calibration":
        if calib_df.empty:
            raise DataError(f"calibration='calibration' but manifest {manifest_path} has no calibration split: it "
                            "was prepared with calibration_fraction 0, or its test split is too small to hold one out "
                            "(each class needs at least 2 test images). Prepare it with a calibration_fraction > 0, "
                            "or use calibration='test'")
        calib = score_images(model, scoring_loader(calib_df, tcfg, cache_root, settings, device),
                             device, with_pixels=False, progress=progress)
        calib_scores, calib_labels = calib.scores, calib_df["label"].to_numpy()
        if calib.maps is not None and (calib_labels == 0).any():
            reference = (calib.maps[calib_labels == 0], "calibration normal images")

    labels = test_df["label"].to_numpy()
    rule = model.decision_method if test.decision is not None else None
    with memory_probe.stage("metrics"):
        metrics: dict[str, Any] = build_metrics(labels, test.scores, test.pixel_metrics, calib_labels, calib_scores,
                                                decision=test.decision, decision_method=rule)
        metrics["per_defect_type"] = metrics_by_defect_type(labels, test.scores, test_df["defect_type"],
                                                            test.pixel_metrics_by_type)
        latency = latency_ms_batch1(model, loader.dataset, device)
    metrics.update({"inference_ms_b1": latency["median"], "inference_ms_b1_p25": latency["p25"],
                    "inference_ms_b1_p75": latency["p75"], "inference_ms_batch": test.ms_per_image,
                    "inference_ms_batch_p25": test.ms_per_image_spread[0],
                    "inference_ms_batch_p75": test.ms_per_image_spread[1], "batch_size": int(loader.batch_size),
                    "timing": timing_conditions(), "device": str(device),
                    "produces_maps": bool(model.produces_maps)})
    if not model.produces_maps:
        metrics["notes"].append(f"produces_maps: {config['name']} scores whole images only (no anomaly maps)")
    if excluded:
        metrics["notes"].append(f"{excluded} anomalous test images were used for training (labelled "
                                "configuration) and are not evaluated")
    if other_data:
        metrics["evaluated_on"] = other_data
        metrics["notes"].append(f"evaluated on other data than the model was trained on: {other_data}")
    if model_dir.resolve() != run_dir.resolve():
        metrics["model_dir"] = os.path.relpath(model_dir, run_dir)  # relative: the results folder may move

    metrics["weights_sha256"] = record["weights_sha256"]  # ties this evaluation to the model it scored

    scores = test_df[SCORE_COLUMNS].copy()
    scores["score"] = test.scores
    if calib_scores is not None:
        extra = calib_df[SCORE_COLUMNS].copy()
        extra["score"] = calib_scores
        scores = pd.concat([scores, extra], ignore_index=True)
    title = title or f"{config['dataset']}_{test_df['category'].iloc[0]}_{config['name']}"
    log.info("evaluated %d test images: image AUROC %s, pixel AUROC %s, AUPRO %s; %.2f ms/image (batch %d), "
             "%.2f ms/image (batch 1)", len(test_df), metrics.get("image_auroc"), metrics.get("pixel_auroc"),
             metrics.get("pixel_aupro"), metrics["inference_ms_batch"], metrics["batch_size"],
             metrics["inference_ms_b1"])
    # everything is written aside, then moved in with metrics.json (the completion record) last:
    # a failure leaves the previous evaluation as it was
    stage = temporary_name(run_dir / "evaluation")
    stage.mkdir(mode=dir_mode())
    try:
        artifacts.write_scores(stage / artifacts.SCORES, scores)
        if test.maps is not None:  # calibration maps too: ensembles normalise maps with calibration normals
            calib_maps = calib.maps if calib is not None else None
            artifacts.write_maps(stage / artifacts.MAPS, test.maps, test_df["image_path"].to_numpy(), calib_maps,
                                 calib_df["image_path"].to_numpy() if calib_maps is not None else None)
        with memory_probe.stage("pictures"):
            write_pictures(stage, title, test_df, test, metrics, loader.dataset, *reference)
        write_json(stage / artifacts.METRICS, metrics)
        publish_staged(stage, run_dir, last=artifacts.METRICS)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return run_dir


def _other_data(manifest: pd.DataFrame, config: dict, manifest_path, model_dir: Path, allowed: bool) -> dict | None:
    """The data set / categories of ``manifest`` when they are not the ones the model trained on."""
    from adlib.data import DataError

    datasets = sorted(manifest["dataset"].astype(str).unique())
    categories = sorted(manifest["category"].astype(str).unique())
    trained = set(config.get("categories") or [config["category"]])
    if datasets == [config["dataset"]] and set(categories) <= trained:
        return None
    if not allowed:
        raise DataError(f"manifest {manifest_path} holds data set {', '.join(datasets)} / categories "
                        f"{', '.join(categories)}, but the model in {model_dir} was trained on {config['dataset']} / "
                        f"{', '.join(sorted(trained))}: give the manifest of the run's own category, or allow other "
                        "data on purpose (CLI: --other-data; recorded in metrics.json)")
    return {"dataset": datasets, "categories": categories}


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
