"""The pictures and text of an evaluated run: the results text, histogram, curves and overlays.

Overlays share one colour scale per run, taken from normal reference images (the calibration
split's normals when there is one, else the test normals, and the caption says which), so a
normal image looks cool and a defect hot (:func:`overlay_scale`). Their title gives the image-level decision with the
threshold it used; the last panel marks pixels above a pixel threshold from the same normal
images. Pictures show examples of every defect type, the worst false positives and false
negatives, and typical normal images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adlib.io import write_text
from adlib.run.scoring import ScoredImages

#: per defect type: the most and least anomalous-looking examples
PER_DEFECT_TYPE = 2
#: worst false positives / false negatives drawn, and typical normal images
WORST_ERRORS = 3
TYPICAL_NORMALS = 2
#: share of normal reference pixels below the overlay's pixel threshold
PIXEL_QUANTILE = 0.995


def write_pictures(run_dir: Path, title: str, test_df: pd.DataFrame, test: ScoredImages, metrics: dict,
                   dataset, reference_maps: np.ndarray | None = None, reference: str = "test normal images") -> None:
    """The results text (the original specification's layout), the score histogram, ROC/PR
    curves and overlays (see the module docstring); ``reference_maps`` are the maps of the normal
    reference images named by ``reference`` (default: the test normals)."""
    from adlib.evaluation import format_results_txt
    from adlib.evaluation.plots import plot_overlay, plot_roc_pr, plot_score_histogram
    from adlib.evaluation.thresholds import METHODS, deployed_threshold

    labels = test_df["label"].to_numpy()
    write_text(run_dir / f"results_{title}_thresholds.txt", format_results_txt(metrics, title))
    # thresholds on the score axis only (a model's own rule thresholds another statistic)
    thresholds = {k: v["threshold"] for k, v in (metrics.get("thresholds") or {}).items() if v and k in METHODS}
    plot_score_histogram(labels, test.scores, thresholds, run_dir / f"histogram_{title}_scores.png", title)
    plot_roc_pr(labels, test.scores, run_dir / f"curves_{title}_roc_pr.png", title)
    if test.maps is None:
        return
    if reference_maps is None or not len(reference_maps):
        reference_maps, reference = test.maps[labels == 0], "test normal images"
    if not len(reference_maps):
        reference_maps, reference = test.maps, "all test images (no normal one)"
    vmin, pixel_threshold, vmax = overlay_scale(reference_maps)
    found = deployed_threshold(metrics)
    decision = (f"{found[0]}, {found[1]}", found[2]) if found else None
    caption = (f"colour scale and pixel threshold from {reference}; "
               + (f"decision: score >= {decision[1]:.4g} ({decision[0]})" if decision else "no image threshold"))
    label = f"pixels >= {PIXEL_QUANTILE:.1%} of normal pixels ({pixel_threshold:.3g})"
    for index, kind in choose_overlays(test_df, test.scores, decision[1] if decision else None):
        image, amap, mask = overlay_inputs(dataset, index, test.maps[index])
        score = float(test.scores[index])
        verdict = "" if decision is None else (" -> anomalous" if score >= decision[1] else " -> normal")
        defect = str(test_df["defect_type"].iloc[index])
        plot_overlay(image, mask if labels[index] == 1 else None, amap, pixel_threshold,
                     run_dir / "overlays" / f"image_{title}_{kind}_{picture_name(dataset, index)}",
                     f"{title} | {kind} | {defect} | score {score:.4g}{verdict}", vmin=vmin, vmax=vmax,
                     caption=caption, threshold_label=label)


def overlay_scale(reference_maps: np.ndarray) -> tuple[float, float, float]:
    """(low end, pixel threshold, high end) of a run's overlay colour scale from its normal
    reference maps: the scale runs from their 1st percentile to twice the distance to the pixel
    threshold (their 99.5th percentile), which sits in the middle (green): normal pixels stay
    blue to green, anything beyond normal turns yellow to red."""
    values = reference_maps.astype(np.float32).ravel()
    low, threshold = float(np.quantile(values, 0.01)), float(np.quantile(values, PIXEL_QUANTILE))
    return low, threshold, low + 2.0 * max(threshold - low, 1e-12)


def choose_overlays(test_df: pd.DataFrame, scores: np.ndarray, threshold: float | None) -> list[tuple[int, str]]:
    """(row, kind) of the test images worth drawing: per defect type its most and least
    anomalous-looking images, the worst false positives and false negatives at ``threshold``,
    and typical normal images; each image once."""
    labels = test_df["label"].to_numpy()
    types = test_df["defect_type"].astype(str).to_numpy()
    picks: dict[int, str] = {}

    def add(rows, kind):
        for row in rows:
            picks.setdefault(int(row), kind)

    for defect in sorted(set(types[labels == 1])):
        rows = np.flatnonzero((labels == 1) & (types == defect))
        ordered = rows[np.argsort(-scores[rows], kind="stable")]
        add([ordered[0], ordered[-1]][:PER_DEFECT_TYPE] if len(ordered) > 1 else ordered, f"defect-{defect}")
    normals = np.flatnonzero(labels == 0)
    if threshold is not None:
        false_pos = normals[scores[normals] >= threshold]
        add(false_pos[np.argsort(-scores[false_pos], kind="stable")][:WORST_ERRORS], "false-positive")
        anomalous = np.flatnonzero(labels == 1)
        false_neg = anomalous[scores[anomalous] < threshold]
        add(false_neg[np.argsort(scores[false_neg], kind="stable")][:WORST_ERRORS], "false-negative")
    if len(normals):
        middle = normals[np.argsort(scores[normals], kind="stable")]
        add(middle[len(middle) // 2: len(middle) // 2 + TYPICAL_NORMALS], "normal")
    return sorted(picks.items())


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
