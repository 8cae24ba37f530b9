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
