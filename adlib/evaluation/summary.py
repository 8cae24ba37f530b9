"""One call that assembles the metric part of ``metrics.json`` from scores, maps and splits."""
from __future__ import annotations

from typing import Any, Mapping

from adlib.evaluation.metrics import image_metrics
from adlib.evaluation.pixel_metrics import PixelMetrics
from adlib.evaluation.thresholds import threshold_report


def build_metrics(labels: Any, scores: Any, pixel: PixelMetrics | Mapping[str, Any] | None = None,
                  calib_labels: Any = None, calib_scores: Any = None, decision: Any = None,
                  decision_method: str | None = None) -> dict[str, Any]:
    """Image metrics, pixel metrics, oracle and transferred thresholds, counts and notes.

    ``pixel`` is a filled :class:`PixelMetrics`, its ``compute()`` result, or ``None`` when the
    model produces no maps or the data has no masks. Timing keys (``inference_ms_*``) are the
    caller's to add. Every ``None`` value has a ``"<key>: <reason>"`` entry in ``notes``.
    ``decision`` / ``decision_method``: a model's own decision rule (see ``threshold_report``).
    """
    out = image_metrics(labels, scores)
    notes: list[str] = list(out.pop("notes"))
    if pixel is None:
        pixel_result: Mapping[str, Any] = {
            "pixel_auroc": None, "pixel_aupro": None,
            "notes": ["pixel_auroc: no anomaly maps or masks", "pixel_aupro: no anomaly maps or masks"]}
    elif isinstance(pixel, PixelMetrics):
        pixel_result = pixel.compute()
    else:
        pixel_result = pixel
    out["pixel_auroc"] = pixel_result.get("pixel_auroc")
    out["pixel_aupro"] = pixel_result.get("pixel_aupro")
    notes += list(pixel_result.get("notes", []))
    report = threshold_report(labels, scores, calib_labels, calib_scores, decision, decision_method)
    out["thresholds"] = report["thresholds"]
    out["transferred_thresholds"] = report["transferred_thresholds"]
    out["notes"] = notes + report["notes"]
    return out


def metrics_by_defect_type(labels: Any, scores: Any, defect_types: Any,
                           pixel_by_type: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per defect type: its image count, image AUROC/AUPR against all normal images, and (from
    ``pixel_by_type``) its pixel AUROC/AUPRO. Industrial users choose models per defect kind."""
    import numpy as np

    labels, scores, types = np.asarray(labels), np.asarray(scores, dtype=float), np.asarray(defect_types, dtype=str)
    normal = labels == 0
    out = {}
    for name in sorted(set(types[labels == 1])):
        chosen = normal | (types == name)
        image = image_metrics(labels[chosen], scores[chosen])
        pixel = (pixel_by_type or {}).get(name, {})
        out[name] = {"n": int((types == name).sum()), "image_auroc": image["image_auroc"],
                     "image_aupr": image["image_aupr"], "pixel_auroc": pixel.get("pixel_auroc"),
                     "pixel_aupro": pixel.get("pixel_aupro")}
    return out
