"""``adlib predict ENSEMBLE_DIR images/``: score new images with every member run, fuse their
scores and maps as the ensemble was fitted, decide with its calibration thresholds.

Writes the CSV (``image_path``, fused ``score``, ``threshold``, ``threshold_method``,
``anomalous``, and each member's raw score ``score_<label>``), the fused maps
(``<csv stem>.maps.npz``: ``maps`` float32 ``[N, H, W]``, ``image_path``) when a member
produces maps, and overlay pictures on request.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adlib import artifacts
from adlib.ensemble.artifact import EnsembleArtifact, load_ensemble
from adlib.ensemble.fitted import threshold_of
from adlib.io import atomic_path
from adlib.settings import Settings


def maps_path_for(out_csv: str | Path) -> Path:
    """Where the fused maps of a prediction CSV go: beside it, ``<stem>.maps.npz``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.maps.npz")


def member_outputs(ensemble: EnsembleArtifact, paths: list[Path], settings: Settings
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], object, np.ndarray]:
    """Each member's raw scores and compact maps of ``paths`` (scored exactly as the runs'
    evaluation did), the data set of the largest member input (for overlays) and the image order."""
    from adlib.run.device import job_device
    from adlib.run.predict import prediction_loader
    from adlib.run.scoring import score_images

    device = job_device(settings)
    scores, maps, largest, order = {}, {}, None, None
    for member in ensemble.members:
        model, config = artifacts.load_model(member.model_dir, backbone_dir=settings.backbone_dir, device=device)
        loader = prediction_loader(paths, config, settings, device)
        dataset = loader.dataset
        wants_maps = member.label in ensemble.fitted.map_members
        scored = score_images(model, loader, device, with_pixels=False, keep_maps=wants_maps, progress=False)
        scores[member.label] = scored.scores
        if wants_maps:
            maps[member.label] = scored.maps
        if wants_maps and (largest is None or dataset.img_size > largest.img_size):
            largest = dataset  # map members are never tiled (member_maps), so their sizes are sides
        order = dataset.manifest["image_path"].to_numpy(str)
        del model
    return scores, maps, largest, order


def predict_ensemble(ensemble_dir: str | Path, images: list[str | Path], settings: Settings, *,
                     out_csv: str | Path, threshold_method: str = "f1_percentile",
                     overlay_dir: str | Path | None = None) -> pd.DataFrame:
    """Score new images with an ensemble directory; write the CSV, fused maps and overlays."""
    from adlib.evaluation.plots import plot_overlay
    from adlib.run.pictures import picture_name
    from adlib.run.predict import collect_images

    ensemble = load_ensemble(ensemble_dir)  # refuses before any model is loaded if a member changed
    fitted = ensemble.fitted
    threshold = threshold_of(fitted, threshold_method)
    paths = collect_images(images)
    raw, raw_maps, dataset, order = member_outputs(ensemble, paths, settings)
    fused = fitted.fuse_scores(raw)
    table = pd.DataFrame({"image_path": order, "score": fused, "threshold": threshold,
                          "threshold_method": threshold_method, "anomalous": fused >= threshold,
                          **{f"score_{label}": values for label, values in raw.items()}})
    with atomic_path(Path(out_csv)) as tmp:
        table.to_csv(tmp, index=False)
    if not fitted.map_members:
        return table
    fused_maps = fitted.fuse_maps(raw_maps)
    artifacts.write_maps(maps_path_for(out_csv), fused_maps, order)
    if overlay_dir is not None:
        for index in range(len(order)):
            plot_overlay(dataset[index]["image"], None, fused_maps[index], fitted.pixel_threshold,
                         Path(overlay_dir) / picture_name(dataset, index),
                         f"ensemble score={fused[index]:.3g} threshold={threshold:.3g}")
    return table
