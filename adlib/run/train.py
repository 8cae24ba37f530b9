"""Train: fit one configuration on the train split of one or more manifests; write the run's
weights, configuration, provenance, fit report and split record."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from adlib import artifacts
from adlib.io import check_writable, staged_directory, write_json
from adlib.models.base import AnomalyModel, FitContext
from adlib.models.registry import ModelSpec, build_model, get_spec, resolve_config
from adlib.run.device import job_device
from adlib.run.loaders import auxiliary_streams, image_loader, scoring_loader, split_of
from adlib.settings import Settings
from adlib.tiling import model_input_side, prepare_tiled_images, tiled
from adlib.training import FitData, Validator, fit, seed_everything

log = logging.getLogger(__name__)
#: the category name of a run trained on every category of a data set (scope "dataset")
ALL_CATEGORIES = "all"


@dataclasses.dataclass(frozen=True)
class TrainingSplit:
    """The images one run trains on and holds out (never test images, see docs/datasets.md)."""

    train: pd.DataFrame  # normal training images (+ labelled anomalies for labelled configurations)
    validation: pd.DataFrame  # normal training images held out (validation_fraction)
    labelled: pd.DataFrame  # anomalous images moved from test to train (labelled configurations)

    def record(self) -> dict[str, Any]:
        """What splits.json holds: which images were held out or moved."""
        return {"num_train": len(self.train), "validation": self.validation["image_path"].tolist(),
                "labelled_train": self.labelled["image_path"].tolist()}


def load_manifests(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One manifest, or several (the categories of a dataset-scope run) stacked."""
    from adlib.data import load_manifest, sort_manifest

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    frames = [load_manifest(Path(p)) for p in paths]
    return frames[0] if len(frames) == 1 else sort_manifest(pd.concat(frames, ignore_index=True))


def training_split(manifest: pd.DataFrame, spec: ModelSpec, train_cfg: dict, seed: int, source: str) -> TrainingSplit:
    """The run's train / validation / labelled images, checked before any expensive work."""
    from adlib.data import DataError
    from adlib.data.splits import carve_labelled_train, carve_validation

    labelled = manifest.iloc[0:0]
    if spec.train_labels == "labelled":
        before = set(split_of(manifest, "test")["image_path"])
        manifest = carve_labelled_train(manifest, float(train_cfg["labelled_fraction"]), seed)
        labelled = manifest[(manifest["split"] == "train") & manifest["image_path"].isin(before)]
        if labelled.empty:
            raise DataError(f"{spec.name} trains on labelled anomalous images, but {source} has no anomalous test "
                            "image that can move to training (each defect type needs at least 2: one stays in the "
                            f"test split). Use {_unsupervised_alternative(spec)}, or add anomalous images.")
    train = split_of(manifest, "train")
    if train.empty:
        raise DataError(f"{source} has no training images: a model needs normal images in the train split")
    train, validation = carve_validation(train, float(train_cfg["validation_fraction"]), seed)
    return TrainingSplit(train, validation, labelled.reset_index(drop=True))


def _unsupervised_alternative(spec: ModelSpec) -> str:
    """The configurations of the same method that train on normal images only, for error messages."""
    from adlib.models.registry import list_models

    names = [n for n in list_models() if get_spec(n).cls is spec.cls and get_spec(n).train_labels == "normal"]
    return f"the unsupervised configuration {' or '.join(names)}" if names else "an unsupervised configuration"


def run_category(manifest: pd.DataFrame, spec: ModelSpec) -> str:
    cats = sorted(manifest["category"].astype(str).unique())
    if len(cats) == 1:
        return cats[0]
    return ALL_CATEGORIES if spec.scope == "dataset" else "+".join(cats)


def train_run(manifest_path: str | Path | Sequence[str | Path], model_name: str, overrides: dict[str, Any] | None,
              run_dir: str | Path, settings: Settings, *, cache_root: str | Path | None = None,
              pretrained: bool = True, progress: bool = True) -> Path:
    """Train ``model_name`` (registry name or alias) on the train split of the manifest(s)."""
    run_dir = Path(run_dir)
    seed_everything(settings.seed)
    spec = get_spec(model_name)
    config = resolve_config(model_name, **(overrides or {}))
    tcfg = config.train
    manifest = load_manifests(manifest_path)
    split = training_split(manifest, spec, tcfg, settings.seed, source=f"manifest {manifest_path}")
    validation_source = _validation_source(manifest, split, tcfg)
    prepare_tiled_images(manifest, tcfg, cache_root)  # tiled runs: images checked against the tile, cached
    check_writable(run_dir.parent)
    device = job_device(settings)
    model: AnomalyModel = build_model(config, pretrained=pretrained, backbone_dir=settings.backbone_dir)
    side = model_input_side(tcfg)
    model.check_input_size((side, side))
    tiled(model, tcfg)  # a tiled configuration of a model without maps fails here, before training
    aux, aux_sources = auxiliary_streams(model, tcfg, settings)

    gradient = model.learns_by == "gradient"
    loader = image_loader(split.train, tcfg, cache_root, settings, shuffle=gradient,
                          drop_last=gradient and len(split.train) > int(tcfg["batch_size"]), training=True)
    validation = (image_loader(split.validation, tcfg, cache_root, settings, shuffle=False, training=True)
                  if not split.validation.empty else None)
    if len(loader.dataset) != len(split.train):
        log.info("tiled: %d training tiles of %d px from %d images", len(loader.dataset), side, len(split.train))
    validator = None
    if tcfg.get("validate_every"):
        validator = _validator(validation_source, manifest, validation, tcfg, cache_root, settings, device)
    log.info("training %s (%s) on %s: %d training images, %d validation images (%s), %d labelled anomalies",
             config.name, spec.family, manifest_path, len(split.train), len(split.validation), validation_source,
             len(split.labelled))
    log.info("resolved configuration: %s", json.dumps(config.to_dict(), sort_keys=True, default=str))
    for info in _weights_provenance(model):
        log.info("weights: %s from %s (sha256 %s)", info.get("backbone"), info.get("source"),
                 (info.get("sha256") or "-")[:16])
    for name, source in aux_sources.items():
        log.info("auxiliary stream %s: %s", name, source)
    log.info("device %s, %d torch threads, seed %d", device, torch.get_num_threads(), settings.seed)
    context = FitContext(device=device, seed=settings.seed, img_size=side, aux_sources=aux_sources)
    report = fit(model, FitData(loader, validation, aux), context, num_epochs=tcfg["num_epochs"],
                 max_steps=tcfg.get("max_steps"), amp=bool(tcfg.get("amp", True)),
                 grad_clip_norm=tcfg.get("grad_clip_norm"), validator=validator,
                 validate_every=tcfg.get("validate_every"), early_stopping_patience=tcfg.get("early_stopping_patience"),
                 early_stopping_target=tcfg.get("early_stopping_target"),
                 micro_batch_size=tcfg.get("micro_batch_size"), progress=progress)

    log.info("fit done in %.1f s: %d epochs, %d steps (%s)%s; peak RSS %.0f MiB", report.fit_seconds,
             report.epochs_run, report.steps, report.stop_reason or "one pass",
             "; stopped early" if report.stopped_early else "", report.peak_rss_mb)
    cfg = artifacts.run_config(config, dataset=str(manifest["dataset"].iloc[0]), category=run_category(manifest, spec),
                               categories=sorted(manifest["category"].astype(str).unique()), seed=settings.seed,
                               pretrained=pretrained)
    extra = {"backbone": config.model.get("backbone"), "backbone_weights": _weights_provenance(model),
             "auxiliary": aux_sources, "scope": spec.scope, "train_labels": spec.train_labels,
             "validation": validation_source, **model.provenance()}
    # built aside and swapped in: a failure here leaves the previous run as it was
    with staged_directory(run_dir) as stage:
        artifacts.save_model(stage, model, cfg)
        write_json(stage / artifacts.PROVENANCE, artifacts.provenance(cfg, device=device, extra=extra))
        write_json(stage / artifacts.SPLITS, split.record())
        write_json(stage / artifacts.FIT, {**report.to_dict(), "num_parameters": model.num_parameters(),
                                           "num_train_images": len(split.train),
                                           "num_validation_images": len(split.validation),
                                           "num_labelled_train_images": len(split.labelled)})
        artifacts.write_record(stage)
    log.info("wrote %s", run_dir)
    return run_dir


def _validation_source(manifest: pd.DataFrame, split: TrainingSplit, tcfg: dict) -> str:
    """What early stopping and post-training statistics may read: never the test split."""
    from adlib.data import DataError

    if tcfg.get("validate_every"):
        if not split_of(manifest, "calibration").empty:
            return "calibration"
        if not split.validation.empty:
            return "validation"
        raise DataError(f"validate_every={tcfg['validate_every']} needs held-out images, and this run has none: set "
                        "validation_fraction > 0 (normal training images held out) or prepare the data with a "
                        "calibration split (calibration_fraction > 0). Early stopping never reads the test split.")
    return "validation" if not split.validation.empty else "none"


def _validator(source: str, manifest: pd.DataFrame, validation: DataLoader | None, tcfg: dict,
               cache_root, settings: Settings, device: torch.device) -> Validator:
    if source == "calibration":
        loader = scoring_loader(split_of(manifest, "calibration"), tcfg, cache_root, settings, device)
        return Validator("calibration_image_auroc", lambda m: _image_auroc(tiled(m, tcfg), loader, device),
                         higher_is_better=True)
    return Validator("validation_loss", lambda m: _mean_loss(m, validation, device), higher_is_better=False)


def _image_auroc(model: AnomalyModel, loader: DataLoader, device: torch.device) -> float | None:
    from adlib.evaluation.metrics import image_auroc

    scores, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            scores.append(model.predict(batch["image"].to(device)).scores.float().cpu().numpy())
            labels.append(batch["label"].numpy())
    return image_auroc(np.concatenate(labels), np.concatenate(scores))


def _mean_loss(model: AnomalyModel, loader: DataLoader, device: torch.device) -> float:
    from adlib.training import to_train_batch

    losses = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            losses.append(float(model.validation_loss(to_train_batch(batch, device, {})).float()))
    return float(np.mean(losses))


def _weights_provenance(model: AnomalyModel) -> list[dict]:
    """Where each pretrained (or random-init) backbone of ``model`` got its weights."""
    seen: dict[str, dict] = {}
    for module in model.modules():
        info = getattr(module, "weights_provenance", None)
        if info:
            seen.setdefault(f"{info.get('backbone')}:{info.get('source')}", info)
    return list(seen.values())
