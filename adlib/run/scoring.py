"""Scoring a loader with a trained model: image scores, compact maps, streamed pixel metrics, time."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from adlib.models.base import AnomalyModel

#: anomaly maps are stored at most this large (per side) in maps.npz
STORED_MAP_SIZE = 128
#: images timed one by one for the batch-1 latency
LATENCY_IMAGES = 8


@dataclasses.dataclass
class ScoredImages:
    """Result of scoring a loader: image scores, compact maps, pixel metrics, time per image, and
    the statistics of the model's own decision rule (models with a ``decision_method``)."""

    scores: np.ndarray
    maps: np.ndarray | None
    pixel_metrics: dict | None
    ms_per_image: float
    decision: np.ndarray | None = None


def score_images(model: AnomalyModel, loader: DataLoader, device: torch.device, *, with_pixels: bool,
                 keep_maps: bool = True, progress: bool = True) -> ScoredImages:
    """Predict every image of ``loader``; stream pixel metrics (against the loader's masks) so
    memory stays bounded; keep compact maps (see :func:`compact_maps`) when ``keep_maps``."""
    from tqdm.auto import tqdm

    from adlib.evaluation import PixelMetrics

    pixels = PixelMetrics() if with_pixels else None
    scores, maps, decisions, model_seconds = [], [], [], 0.0
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
            if out.decision is not None:
                decisions.append(out.decision.float().cpu().numpy())
            if out.maps is not None:
                amap = out.maps.float().cpu()
                if pixels is not None:
                    pixels.update(amap.numpy(), batch["mask"][:, 0].numpy() > 0.5)
                if keep_maps:
                    maps.append(compact_maps(amap))
    n = sum(len(s) for s in scores)
    pixel_metrics = pixels.compute() if pixels is not None else None
    return ScoredImages(np.concatenate(scores), np.concatenate(maps) if maps else None, pixel_metrics,
                        1000.0 * model_seconds / max(n, 1), np.concatenate(decisions) if decisions else None)


def compact_maps(maps: torch.Tensor) -> np.ndarray:
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
