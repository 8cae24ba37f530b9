"""The three steps of a benchmark run: prepare data, train, evaluate.

Each step reads and writes files only, so the Snakemake workflow, the CLI and :mod:`adlib.api`
share them. A step never leaves a half-written file behind (see :mod:`adlib.io`).
"""
from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from adlib import artifacts
from adlib.io import atomic_path, write_json, write_text
from adlib.models.base import AnomalyModel, FitContext
from adlib.models.registry import build_model, resolve_config
from adlib.settings import Settings
from adlib.training import fit, resolve_device, seed_everything

log = logging.getLogger(__name__)

#: anomaly maps are stored at most this large (per side) in maps.npz
STORED_MAP_SIZE = 128
#: images timed one by one for the batch-1 latency
LATENCY_IMAGES = 8
#: test images drawn as overlay pictures, per class (normal / anomalous)
OVERLAYS_PER_CLASS = 3


# ----------------------------------------------------------------------------------------------
# prepare
def prepare_data(dataset_cfg: dict, category: str, img_size: int, manifest_out: str | Path,
                 cache_root: str | Path, *, calibration_fraction: float = 0.0, seed: int = 0) -> Path:
    """Index one category of a data set into a manifest and build its decoded-image cache."""
    from adlib.data import ImageCache, index_dataset, save_manifest

    options = dict(dataset_cfg.get("options") or {})
    seed = options.pop("seed", seed)  # a layout's own seed option (synthetic, custom split) wins
    manifest = index_dataset(dataset_cfg["layout"], dataset_cfg["root"], category, dataset=dataset_cfg["name"],
                             calibration_fraction=calibration_fraction, seed=seed, **options)
    ImageCache.build(manifest, Path(cache_root), img_size)
    save_manifest(manifest, Path(manifest_out))
    return Path(manifest_out)


def _loader(manifest: pd.DataFrame, train_cfg: dict, cache_root: str | Path | None, settings: Settings, *,
            shuffle: bool, batch_size: int | None = None, drop_last: bool = False) -> DataLoader:
    from adlib.data import ImageCache, ImageDataset

    size, crop = int(train_cfg["img_size"]), train_cfg.get("center_crop")
    cache = ImageCache.build(manifest, Path(cache_root), size, center_crop=crop) if cache_root is not None else None
    dataset = ImageDataset(manifest, size, center_crop=crop, normalize=False, cache=cache)
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(dataset, batch_size=batch_size or int(train_cfg["batch_size"]), shuffle=shuffle,
                      drop_last=drop_last, num_workers=settings.num_workers, generator=generator,
                      pin_memory=False, persistent_workers=False)


def job_device(settings: Settings) -> torch.device:
    """Set this process up for a job and return its device.

    Large freed buffers are kept for reuse (see :mod:`adlib.allocator`: a 3x faster CPU
    forward). On a box with several GPUs the process claims a free one (a file lock held until
    the process ends, see :mod:`adlib.devices`); elsewhere that is a no-op.
    """
    from adlib.allocator import reuse_freed_memory
    from adlib.devices import acquire_device

    reuse_freed_memory()
    return resolve_device(acquire_device(settings.device).device)


def _split(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    return manifest[manifest["split"] == split].reset_index(drop=True)


def _aux_dir(resolver_name: str, settings: Settings) -> Path | None:
    from adlib import data

    try:
        return getattr(data, resolver_name)(settings.data_root)
    except (FileNotFoundError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# train
def train_run(manifest_path: str | Path, model_name: str, overrides: dict[str, Any] | None, run_dir: str | Path,
              settings: Settings, *, cache_root: str | Path | None = None, pretrained: bool = True,
              progress: bool = True) -> Path:
    """Train ``model_name`` on the train split of a manifest; write weights, config, provenance, fit report."""
    from adlib.data import DataError, load_manifest

    run_dir = Path(run_dir)
    seed_everything(settings.seed)
    config = resolve_config(model_name, **(overrides or {}))
    manifest = load_manifest(Path(manifest_path))
    train_df = _split(manifest, "train")
    if train_df.empty:
        raise DataError(f"manifest {manifest_path} has no training images: a model needs normal images "
                        "in the train split")
    dataset, category = str(manifest["dataset"].iloc[0]), _category_name(manifest)
    device = job_device(settings)
    tcfg = config.train
    model: AnomalyModel = build_model(config, pretrained=pretrained, backbone_dir=settings.backbone_dir)
    drop_last = model.learns_by == "gradient" and len(train_df) > int(tcfg["batch_size"])
    loader = _loader(train_df, tcfg, cache_root, settings, shuffle=model.learns_by == "gradient",
                     drop_last=drop_last)
    context = FitContext(device=device, num_epochs=int(tcfg["num_epochs"]), steps_per_epoch=len(loader),
                         num_train_images=len(train_df), seed=settings.seed, img_size=int(tcfg["img_size"]),
                         texture_dir=_aux_dir("resolve_texture_dir", settings),
                         imagenet_dir=_aux_dir("resolve_imagenet_dir", settings))
    validate = None
    if tcfg.get("validate_every"):
        val_df = _split(manifest, "calibration")
        val_df = val_df if not val_df.empty else _split(manifest, "test")
        val_loader = _loader(val_df, tcfg, cache_root, settings, shuffle=False)
        validate = lambda m: _validation_auroc(m, val_loader, device)  # noqa: E731
    report = fit(model, loader, context, num_epochs=int(tcfg["num_epochs"]), max_steps=tcfg.get("max_steps"),
                 amp=bool(tcfg.get("amp", True)), validate=validate, validate_every=tcfg.get("validate_every"),
                 early_stopping_patience=tcfg.get("early_stopping_patience"),
                 early_stopping_target=tcfg.get("early_stopping_target"), progress=progress)
    cfg = artifacts.run_config(config, dataset=dataset, category=category, seed=settings.seed, pretrained=pretrained)
    artifacts.save_model(run_dir, model, cfg)
    extra = {"backbone": config.model.get("backbone"), "backbone_weights": _weights_provenance(model),
             "synthesis_source": getattr(model, "synthesis_source", None)}
    write_json(run_dir / artifacts.PROVENANCE, artifacts.provenance(cfg, device=device, extra=extra))
    write_json(run_dir / artifacts.FIT, {**report.to_dict(), "num_parameters": model.num_parameters(),
                                         "num_train_images": len(train_df)})
    return run_dir


def _weights_provenance(model: AnomalyModel) -> list[dict]:
    """Where each pretrained (or random-init) backbone of ``model`` got its weights."""
    seen: dict[str, dict] = {}
    for module in model.modules():
        info = getattr(module, "weights_provenance", None)
        if info:
            seen.setdefault(f"{info.get('backbone')}:{info.get('source')}", info)
    return list(seen.values())


def _category_name(manifest: pd.DataFrame) -> str:
    cats = sorted(manifest["category"].astype(str).unique())
    return cats[0] if len(cats) == 1 else "+".join(cats)


def _validation_auroc(model: AnomalyModel, loader: DataLoader, device: torch.device) -> float | None:
    from adlib.evaluation import image_auroc

    scores, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            scores.append(model.predict(batch["image"].to(device)).scores.float().cpu().numpy())
            labels.append(batch["label"].numpy())
    return image_auroc(np.concatenate(labels), np.concatenate(scores))


# ----------------------------------------------------------------------------------------------
# evaluate
def evaluate_run(run_dir: str | Path, manifest_path: str | Path, settings: Settings, *,
                 cache_root: str | Path | None = None, calibration: str = "test", progress: bool = True,
                 title: str | None = None) -> Path:
    """Score the test split with a trained run; write scores, maps, metrics, thresholds and pictures.

    Picture and results-text names carry ``title`` (default ``<dataset>_<category>_<model>``).

    ``calibration="calibration"`` also fits the thresholds on the manifest's calibration split
    and reports them applied to the test split ("transferred"), beside the oracle thresholds
    fitted on the test split itself.
    """
    from adlib.data import DataError, load_manifest
    from adlib.evaluation import build_metrics

    run_dir = Path(run_dir)
    device = job_device(settings)
    model, config = artifacts.load_model(run_dir, backbone_dir=settings.backbone_dir, device=device)
    manifest = load_manifest(Path(manifest_path))
    test_df = _split(manifest, "test")
    if test_df.empty:
        raise DataError(f"manifest {manifest_path} has no test images to evaluate")
    tcfg = config["train"]
    loader = _loader(test_df, tcfg, cache_root, settings, shuffle=False)
    test = score_images(model, loader, device, with_pixels=model.produces_maps, progress=progress)

    calib_scores = calib_labels = None
    calib_df = _split(manifest, "calibration")
    if calibration == "calibration":
        if calib_df.empty:
            raise DataError(f"calibration='calibration' but manifest {manifest_path} has no calibration split; "
                            "prepare the data with a calibration_fraction > 0")
        calib = score_images(model, _loader(calib_df, tcfg, cache_root, settings, shuffle=False),
                             device, with_pixels=False, progress=progress)
        calib_scores, calib_labels = calib.scores, calib_df["label"].to_numpy()

    labels = test_df["label"].to_numpy()
    metrics: dict[str, Any] = build_metrics(labels, test.scores, test.pixel_metrics, calib_labels, calib_scores)
    metrics.update({"inference_ms_b1": latency_ms_batch1(model, loader.dataset, device),
                    "inference_ms_batch": test.ms_per_image, "batch_size": int(tcfg["batch_size"]),
                    "device": str(device),
                    "produces_maps": bool(model.produces_maps)})
    if not model.produces_maps:
        metrics["notes"].append(f"produces_maps: {config['name']} scores whole images only (no anomaly maps)")

    scores = test_df[["image_path", "category", "defect_type", "label", "split"]].copy()
    scores["score"] = test.scores
    if calib_scores is not None:
        extra = calib_df[["image_path", "category", "defect_type", "label", "split"]].copy()
        extra["score"] = calib_scores
        scores = pd.concat([scores, extra], ignore_index=True)
    _write_parquet(run_dir / artifacts.SCORES, scores)
    if test.maps is not None:
        _write_maps(run_dir / artifacts.MAPS, test.maps, test_df["image_path"].to_numpy())
    write_json(run_dir / artifacts.METRICS, metrics)
    write_pictures(run_dir, title or _run_title(config), test_df, test, metrics, loader.dataset)
    return run_dir


class ScoredImages:
    """Result of scoring a loader: image scores, compact maps, pixel metrics, time per image."""

    def __init__(self, scores: np.ndarray, maps: np.ndarray | None, pixel_metrics: dict | None,
                 ms_per_image: float):
        self.scores, self.maps, self.pixel_metrics, self.ms_per_image = scores, maps, pixel_metrics, ms_per_image


def score_images(model: AnomalyModel, loader: DataLoader, device: torch.device, *, with_pixels: bool,
                 keep_maps: bool = True, progress: bool = True) -> ScoredImages:
    """Predict every image of ``loader``; stream pixel metrics (against the loader's masks) so
    memory stays bounded; keep compact maps (see :func:`_compact`) when ``keep_maps``."""
    from tqdm.auto import tqdm

    from adlib.evaluation import PixelMetrics

    pixels = PixelMetrics() if with_pixels else None
    scores, maps, model_seconds = [], [], 0.0
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
            images = batch["image"].to(device)
            start = time.perf_counter()
            out = model.predict(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_seconds += time.perf_counter() - start
            scores.append(out.scores.float().cpu().numpy())
            if out.maps is not None:
                amap = out.maps.float().cpu()
                if pixels is not None:
                    pixels.update(amap.numpy(), batch["mask"][:, 0].numpy() > 0.5)
                if keep_maps:
                    maps.append(_compact(amap))
    n = sum(len(s) for s in scores)
    pixel_metrics = pixels.compute() if pixels is not None else None
    return ScoredImages(np.concatenate(scores), np.concatenate(maps) if maps else None, pixel_metrics,
                        1000.0 * model_seconds / max(n, 1))


def _compact(maps: torch.Tensor) -> np.ndarray:
    """Down-sample maps to at most STORED_MAP_SIZE per side and store as float16."""
    h, w = maps.shape[-2:]
    if max(h, w) > STORED_MAP_SIZE:
        scale = STORED_MAP_SIZE / max(h, w)
        maps = torch.nn.functional.interpolate(maps[:, None], size=(round(h * scale), round(w * scale)),
                                               mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy().astype(np.float16)


def latency_ms_batch1(model: AnomalyModel, dataset, device: torch.device, n: int = LATENCY_IMAGES) -> float:
    """Mean milliseconds per image at batch size 1, over up to ``n`` images after one warm-up."""
    n = min(n, len(dataset))
    images = [dataset[i]["image"][None].to(device) for i in range(n)]
    with torch.no_grad():
        model.predict(images[0])
        start = time.perf_counter()
        for image in images:
            model.predict(image)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 1000.0 * (time.perf_counter() - start) / max(n, 1)


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _write_maps(path: Path, maps: np.ndarray, image_paths: np.ndarray) -> None:
    """An ``.npz`` (``maps``, ``image_path``) deflated at level 1: 2.4x faster than
    ``np.savez_compressed``'s level 6 for 2% more bytes on float16 maps."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in (("maps", maps), ("image_path", image_paths.astype(str))):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def _run_title(config: dict) -> str:
    return f"{config['dataset']}_{config['category']}_{config['name']}"


def write_pictures(run_dir: Path, title: str, test_df: pd.DataFrame, test: ScoredImages, metrics: dict,
                   dataset) -> None:
    """The seed's results text, the score histogram, ROC/PR curves and a few overlays."""
    from adlib.evaluation import format_results_txt
    from adlib.evaluation.plots import plot_overlay, plot_roc_pr, plot_score_histogram

    labels = test_df["label"].to_numpy()
    write_text(run_dir / f"results_{title}_thresholds.txt", format_results_txt(metrics, title))
    thresholds = {k: v["threshold"] for k, v in (metrics.get("thresholds") or {}).items() if v}
    plot_score_histogram(labels, test.scores, thresholds, run_dir / f"histogram_{title}_scores.png", title)
    plot_roc_pr(labels, test.scores, run_dir / f"curves_{title}_roc_pr.png", title)
    if test.maps is None:
        return
    threshold = _overlay_threshold(test.maps, labels)
    for label in (0, 1):
        for index in np.flatnonzero(labels == label)[:OVERLAYS_PER_CLASS]:
            kind = "anomalous" if label else "normal"
            image, amap, mask = _overlay_inputs(dataset, int(index), test.maps[index])
            plot_overlay(image, mask if label == 1 else None, amap, threshold,
                         run_dir / "overlays" / f"image_{title}_{kind}_{_picture_name(dataset, int(index))}",
                         f"{title} {kind} score={test.scores[index]:.3g}")


def _overlay_inputs(dataset, index: int, compact_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 image, map at image size, mask) of one data set item for an overlay picture."""
    item = dataset[index]
    image = (item["image"].permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    amap = torch.from_numpy(compact_map.astype(np.float32))[None, None]
    amap = torch.nn.functional.interpolate(amap, size=image.shape[:2], mode="bilinear", align_corners=False)
    return image, amap[0, 0].numpy(), item["mask"][0].numpy()


def _picture_name(dataset, index: int) -> str:
    """Unique, readable picture name: index, defect folder and file stem."""
    path = Path(dataset.manifest["image_path"].iloc[index])
    return f"{index:04d}_{path.parent.name}_{path.stem}.png"


def _overlay_threshold(maps: np.ndarray, labels: np.ndarray) -> float:
    """Pixel threshold for the overlay's binary panel: 99th percentile of normal images' map values."""
    normal = maps[labels == 0]
    values = (normal if len(normal) else maps).astype(np.float32).ravel()
    return float(np.quantile(values, 0.99))


# ----------------------------------------------------------------------------------------------
# predict on new images
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
    for key in ("transferred_thresholds", "thresholds"):
        result = (metrics.get(key) or {}).get(method)
        if result:
            return float(result["threshold"])
    raise ValueError(f"the run has no usable {method!r} threshold (see its metrics.json notes); "
                     "choose another --threshold-method, e.g. percentile_95")


def predict_images(run_dir: str | Path, images: list[str | Path], settings: Settings, *, out_csv: str | Path,
                   threshold_method: str = "f1_percentile", overlay_dir: str | Path | None = None) -> pd.DataFrame:
    """Score new images with a saved run; write a CSV of scores and decisions (and overlays)."""
    from adlib.data import ImageDataset
    from adlib.data.manifest import make_manifest, manifest_row
    from adlib.evaluation.plots import plot_overlay
    from adlib.io import read_json

    run_dir = Path(run_dir)
    device = job_device(settings)
    model, config = artifacts.load_model(run_dir, backbone_dir=settings.backbone_dir, device=device)
    threshold = decision_threshold(read_json(run_dir / artifacts.METRICS), threshold_method)
    paths = collect_images(images)
    # labels are unknown for new images; 0 is a placeholder the scoring never reads
    manifest = make_manifest(manifest_row("predict", config["category"], "test", p, "", 0, "unknown") for p in paths)
    size, crop = int(config["train"]["img_size"]), config["train"].get("center_crop")
    dataset = ImageDataset(manifest, size, center_crop=crop, normalize=False)
    loader = DataLoader(dataset, batch_size=int(config["train"]["batch_size"]), shuffle=False)
    scored = score_images(model, loader, device, with_pixels=False, keep_maps=overlay_dir is not None,
                          progress=False)
    table = pd.DataFrame({"image_path": manifest["image_path"], "score": scored.scores,
                          "threshold": threshold, "threshold_method": threshold_method,
                          "anomalous": scored.scores >= threshold})
    with atomic_path(Path(out_csv)) as tmp:
        table.to_csv(tmp, index=False)
    if overlay_dir is not None and scored.maps is not None:
        for index in range(len(dataset)):
            image, amap, _ = _overlay_inputs(dataset, index, scored.maps[index])
            plot_overlay(image, None, amap, None, Path(overlay_dir) / _picture_name(dataset, index),
                         f"score={scored.scores[index]:.3g} threshold={threshold:.3g}")
    return table
