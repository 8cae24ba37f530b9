"""The pictures and text of an evaluated run: the results text, histogram, curves, overlays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adlib.io import write_text
from adlib.run.scoring import ScoredImages

#: test images drawn as overlay pictures, per class (normal / anomalous)
OVERLAYS_PER_CLASS = 3


def write_pictures(run_dir: Path, title: str, test_df: pd.DataFrame, test: ScoredImages, metrics: dict,
                   dataset) -> None:
    """The results text (the original specification's layout), the score histogram, ROC/PR
    curves and a few overlays."""
    from adlib.evaluation import format_results_txt
    from adlib.evaluation.plots import plot_overlay, plot_roc_pr, plot_score_histogram
    from adlib.evaluation.thresholds import METHODS

    labels = test_df["label"].to_numpy()
    write_text(run_dir / f"results_{title}_thresholds.txt", format_results_txt(metrics, title))
    # thresholds on the score axis only (a model's own rule thresholds another statistic)
    thresholds = {k: v["threshold"] for k, v in (metrics.get("thresholds") or {}).items() if v and k in METHODS}
    plot_score_histogram(labels, test.scores, thresholds, run_dir / f"histogram_{title}_scores.png", title)
    plot_roc_pr(labels, test.scores, run_dir / f"curves_{title}_roc_pr.png", title)
    if test.maps is None:
        return
    threshold = overlay_threshold(test.maps, labels)
    for label in (0, 1):
        for index in np.flatnonzero(labels == label)[:OVERLAYS_PER_CLASS]:
            kind = "anomalous" if label else "normal"
            image, amap, mask = overlay_inputs(dataset, int(index), test.maps[index])
            plot_overlay(image, mask if label == 1 else None, amap, threshold,
                         run_dir / "overlays" / f"image_{title}_{kind}_{picture_name(dataset, int(index))}",
                         f"{title} {kind} score={test.scores[index]:.3g}")


def overlay_inputs(dataset, index: int, compact_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 image, map at image size, mask) of one data set item for an overlay picture."""
    item = dataset[index]
    image = (item["image"].permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    amap = torch.from_numpy(compact_map.astype(np.float32))[None, None]
    amap = torch.nn.functional.interpolate(amap, size=image.shape[:2], mode="bilinear", align_corners=False)
    return image, amap[0, 0].numpy(), item["mask"][0].numpy()


def picture_name(dataset, index: int) -> str:
    """Unique, readable picture name: index, defect folder and file stem."""
    path = Path(dataset.manifest["image_path"].iloc[index])
    return f"{index:04d}_{path.parent.name}_{path.stem}.png"


def overlay_threshold(maps: np.ndarray, labels: np.ndarray) -> float:
    """Pixel threshold for the overlay's binary panel: 99th percentile of normal images' map values."""
    normal = maps[labels == 0]
    values = (normal if len(normal) else maps).astype(np.float32).ravel()
    return float(np.quantile(values, 0.99))
