"""Scoring a loader with a trained model: image scores, compact maps, streamed pixel metrics, time."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from adlib.data.manifest import NORMAL
from adlib.models.base import AnomalyModel

#: anomaly maps are stored at most this large (per side) in maps.npz
STORED_MAP_SIZE = 128
#: images timed one by one for the batch-1 latency, and how many timed passes over them
LATENCY_IMAGES = 8
LATENCY_PASSES = 5


@dataclasses.dataclass
class ScoredImages:
    """Result of scoring a loader: image scores, compact maps, pixel metrics, time per image, and
    the statistics of the model's own decision rule (models with a ``decision_method``)."""

    scores: np.ndarray
    maps: np.ndarray | None
    pixel_metrics: dict | None
    pixel_metrics_by_type: dict[str, dict]
    ms_per_image: float  # median over batches (the first, warm-up batch excluded when there are more)
    ms_per_image_spread: tuple[float, float] = (float("nan"), float("nan"))  # 25th / 75th percentile
    decision: np.ndarray | None = None  # the model's own decision statistic (>= 0: anomalous), if it has one


def score_images(model: AnomalyModel, loader: DataLoader, device: torch.device, *, with_pixels: bool,
                 keep_maps: bool = True, progress: bool = True, defect_types: Sequence[str] | None = None
                 ) -> ScoredImages:
    """Predict every image of ``loader``; stream pixel metrics (against the loader's masks) so
    memory stays bounded; keep compact maps (see :func:`compact_maps`) when ``keep_maps``.

    With ``defect_types`` (one per data set row, ``"good"`` for normals) pixel metrics are also
    streamed per defect type: that type's images against all normal images.
    """
    from tqdm.auto import tqdm

    from adlib.evaluation import PixelMetrics

    pixels = PixelMetrics() if with_pixels else None
    types = list(defect_types) if defect_types is not None and with_pixels else None
    by_type = {t: PixelMetrics() for t in sorted(set(types or [])) if t != NORMAL}
    scores, maps, decisions, per_image_ms = [], [], [], []
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
            images = batch["image"].to(device)
            start = time.perf_counter()
            out = model.predict(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_image_ms.append(1000.0 * (time.perf_counter() - start) / len(images))
            scores.append(out.scores.float().cpu().numpy())
            if out.decision is not None:
                decisions.append(out.decision.float().cpu().numpy())
            if out.maps is not None:
                amap = out.maps.float().cpu()
                if pixels is not None:
                    masks = batch["mask"][:, 0].numpy() > 0.5
                    pixels.update(amap.numpy(), masks)
                    if types is not None:
                        _update_by_type(by_type, [types[int(i)] for i in batch["index"]], amap.numpy(), masks)
                if keep_maps:
                    maps.append(compact_maps(amap))
    pixel_metrics = pixels.compute() if pixels is not None else None
    timed = np.asarray(per_image_ms[1:] if len(per_image_ms) > 1 else per_image_ms)
    return ScoredImages(np.concatenate(scores), stack_maps(maps) if maps else None, pixel_metrics,
                        {t: m.compute() for t, m in by_type.items() if m.grid is not None},
                        float(np.median(timed)), (float(np.percentile(timed, 25)), float(np.percentile(timed, 75))),
                        np.concatenate(decisions) if decisions else None)


def _update_by_type(by_type: dict, types: list[str], maps: np.ndarray, masks: np.ndarray) -> None:
    """Each defect type's metrics see its own images and every normal image."""
    normal = np.array([t == NORMAL for t in types])
    for name, metrics in by_type.items():
        chosen = normal | np.array([t == name for t in types])
        if chosen.any():
            metrics.update(maps[chosen], masks[chosen])


def compact_maps(maps: torch.Tensor) -> np.ndarray:
    """Down-sample maps to at most STORED_MAP_SIZE per side and store as float16."""
    h, w = maps.shape[-2:]
    if max(h, w) > STORED_MAP_SIZE:
        scale = STORED_MAP_SIZE / max(h, w)
        maps = torch.nn.functional.interpolate(maps[:, None], size=(round(h * scale), round(w * scale)),
                                               mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy().astype(np.float16)


def stack_maps(batches: list[np.ndarray]) -> np.ndarray:
    """One array of the compact maps of every batch; maps of images of different sizes (tiled
    runs keep each image's own) are stretched to ``STORED_MAP_SIZE`` squares first."""
    if len({batch.shape[1:] for batch in batches}) == 1:
        return np.concatenate(batches)
    square = (STORED_MAP_SIZE, STORED_MAP_SIZE)
    return np.concatenate([torch.nn.functional.interpolate(torch.from_numpy(batch.astype(np.float32))[:, None],
                                                           size=square, mode="bilinear", align_corners=False)
                           [:, 0].numpy().astype(np.float16) for batch in batches])


def latency_ms_batch1(model: AnomalyModel, dataset, device: torch.device, n: int = LATENCY_IMAGES,
                      passes: int = LATENCY_PASSES) -> dict[str, float]:
    """Milliseconds per image at batch size 1: the median of ``passes`` timed passes over up to
    ``n`` images, after a warm-up pass, with the 25th/75th percentiles of single images."""
    n = min(n, len(dataset))
    images = [dataset[i]["image"][None].to(device) for i in range(n)]
    times = []
    with torch.no_grad():
        for image in images:  # warm-up: allocator pools, kernel selection, caches
            model.predict(image)
        for _ in range(passes):
            for image in images:
                start = time.perf_counter()
                model.predict(image)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(1000.0 * (time.perf_counter() - start))
    return {"median": float(np.median(times)), "p25": float(np.percentile(times, 25)),
            "p75": float(np.percentile(times, 75))}


def timing_conditions() -> dict[str, float | int]:
    """What a timing depends on besides the model: torch threads and the machine's load."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_1min": round(load[0], 2),
            "load_5min": round(load[1], 2)}
