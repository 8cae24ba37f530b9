"""A fitted ensemble: which members, how each one's scores and maps are normalised, how they are
fused, and the decision thresholds; fitted on a block's fit split only.

The report, ``adlib ensemble build`` and ``adlib predict ENSEMBLE_DIR`` all go through
:func:`fit_ensemble` and :meth:`FittedEnsemble.fuse_scores` / :meth:`FittedEnsemble.fuse_maps`,
so a deployed ensemble scores an image exactly as the report did.

Maps: every member's compact map (maps.npz, at most 128 px a side) is normalised with statistics
of its reference normal maps, resized (bilinear) to the largest member map and fused with the
same rule and weights as the scores. Members without maps (image-level models) join the score
fusion only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from adlib.ensemble.fusion import check_fusion, fit_stacking, fuse, stacking_problem
from adlib.ensemble.normalization import Normalizer, check_normalization
from adlib.ensemble.runs import Block, MemberMaps, SplitScores
from adlib.evaluation.thresholds import METHODS, fit_thresholds

#: the pixel threshold of fused maps: this quantile of the reference normal images' fused pixels
PIXEL_QUANTILE = 0.99


@dataclasses.dataclass
class FittedEnsemble:
    members: list[str]
    normalization: str
    fusion: str
    fit_split: str
    score_normalizers: dict[str, Normalizer]
    weights: dict[str, float] | None = None
    intercept: float = 0.0
    thresholds: dict[str, float | None] = dataclasses.field(default_factory=dict)
    map_members: list[str] = dataclasses.field(default_factory=list)
    map_normalizers: dict[str, Normalizer] = dataclasses.field(default_factory=dict)
    map_size: tuple[int, int] | None = None
    map_reference: str | None = None  # which images the map statistics came from
    pixel_threshold: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    # -- applying
    def fuse_scores(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fused score per image from each member's raw scores."""
        stack = np.stack([self.score_normalizers[m](raw[m]) for m in self.members])
        return fuse(stack, self.fusion, self._weights(self.members), self.intercept)

    def fuse_maps(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fused maps ``[n, H, W]`` float32 from each map member's compact maps ``[n, h, w]``."""
        if not self.map_members:
            raise ValueError("this ensemble has no member with anomaly maps")
        stack = np.stack([resize_maps(self.map_normalizers[m](raw[m], np.float32), self.map_size)
                          for m in self.map_members])
        return fuse(stack, self.fusion, self._weights(self.map_members), self.intercept)

    def _weights(self, members: Sequence[str]) -> list[float] | None:
        return None if self.weights is None else [self.weights[m] for m in members]

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"members": self.members, "normalization": self.normalization, "fusion": self.fusion,
                "fit_split": self.fit_split, "weights": self.weights, "intercept": self.intercept,
                "thresholds": self.thresholds, "pixel_threshold": self.pixel_threshold,
                "score_normalizers": {m: n.to_dict() for m, n in self.score_normalizers.items()},
                "map_members": self.map_members, "map_size": list(self.map_size) if self.map_size else None,
                "map_reference": self.map_reference,
                "map_normalizers": {m: n.to_dict() for m, n in self.map_normalizers.items()}, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FittedEnsemble":
        return cls(list(data["members"]), data["normalization"], data["fusion"], data["fit_split"],
                   {m: Normalizer.from_dict(n) for m, n in data["score_normalizers"].items()},
                   data.get("weights"), float(data.get("intercept", 0.0)), dict(data.get("thresholds") or {}),
                   list(data.get("map_members") or []),
                   {m: Normalizer.from_dict(n) for m, n in (data.get("map_normalizers") or {}).items()},
                   tuple(data["map_size"]) if data.get("map_size") else None, data.get("map_reference"),
                   data.get("pixel_threshold"), list(data.get("notes") or []))


# ----------------------------------------------------------------------------------------------
# fitting
def normalized_matrix(split: SplitScores, normalizers: Mapping[str, Normalizer], members: Sequence[str]) -> np.ndarray:
    """``[n, M]`` normalised scores of ``members`` on one split."""
    return np.stack([normalizers[m](split.raw[m]) for m in members], axis=1)


def fit_ensemble(block: Block, members: Sequence[str], normalization: str, fusion: str) -> FittedEnsemble:
    """Normalisers, weights and thresholds of one combination, from the block's fit split only."""
    check_normalization(normalization)
    check_fusion(fusion)
    members = list(members)
    fit = block.fit
    normalizers = {m: Normalizer.fit(normalization, fit.normals(m)) for m in members}
    ensemble = FittedEnsemble(members, normalization, fusion, block.fit_split, normalizers)
    if fusion == "weighted":
        problem = stacking_problem(fit.label)
        if problem:
            raise ValueError(f"{block.name()}: {problem} in the {block.fit_split} split; use mean or max fusion")
        weights, ensemble.intercept = fit_stacking(normalized_matrix(fit, normalizers, members), fit.label)
        ensemble.weights = {m: float(w) for m, w in zip(members, weights)}
    fused = ensemble.fuse_scores(fit.raw)
    for method, result in fit_thresholds(fit.label, fused, f"{block.fit_split} images").items():
        ensemble.thresholds[method] = result.threshold
        if result.note:
            ensemble.notes.append(f"thresholds.{method}: {result.note}")
    return ensemble


def fit_maps(ensemble: FittedEnsemble, maps: Mapping[str, MemberMaps], fused_reference: bool = True) -> None:
    """Add map normalisers, the common map size and the pixel threshold (members in ``maps``
    take part in the map fusion; the others are image-level only)."""
    members = [m for m in ensemble.members if m in maps]
    if not members:
        ensemble.notes.append("maps: no member produces anomaly maps; the ensemble scores whole images only")
        return
    views = {m: maps[m].view for m in members}
    if len(set(views.values())) > 1:
        ensemble.notes.append(f"maps: the members' maps cover different parts of the image (center_crop / img_size "
                              f"{views}), so they are not fused; the ensemble scores whole images only")
        return
    ensemble.map_members = members
    ensemble.map_normalizers = {m: Normalizer.fit(ensemble.normalization, maps[m].reference_normals)
                                for m in members}
    sizes = [maps[m].test.shape[-2:] for m in members]
    ensemble.map_size = (max(h for h, _ in sizes), max(w for _, w in sizes))
    ensemble.map_reference = ", ".join(sorted({maps[m].reference for m in members}))
    if "optimistic" in ensemble.map_reference:
        ensemble.notes.append(f"maps: normalisation statistics from {ensemble.map_reference}")
    image_only = [m for m in ensemble.members if m not in maps]
    if image_only:
        ensemble.notes.append(f"maps: {', '.join(image_only)} score whole images only and join the image-level "
                              "fusion only")
    if fused_reference:
        normals = ensemble.fuse_maps({m: maps[m].reference_normals for m in members})
        ensemble.pixel_threshold = float(np.quantile(normals, PIXEL_QUANTILE))


def resize_maps(maps: np.ndarray, size: tuple[int, int] | None, chunk: int = 64) -> np.ndarray:
    """Bilinear resize of ``[n, h, w]`` float32 maps to ``size`` (as compact_maps does)."""
    import torch

    if size is None or tuple(maps.shape[-2:]) == tuple(size):
        return maps
    out = np.empty((maps.shape[0], *size), dtype=np.float32)
    for start in range(0, maps.shape[0], chunk):
        block = torch.from_numpy(np.ascontiguousarray(maps[start:start + chunk]))[:, None]
        out[start:start + chunk] = torch.nn.functional.interpolate(block, size=tuple(size), mode="bilinear",
                                                                   align_corners=False)[:, 0].numpy()
    return out


def threshold_of(ensemble: FittedEnsemble, method: str) -> float:
    """The ensemble's fitted threshold for ``method`` (a clear error when it could not be fitted)."""
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    value = ensemble.thresholds.get(method)
    if value is None:
        notes = "; ".join(n for n in ensemble.notes if n.startswith(f"thresholds.{method}")) or "not fitted"
        raise ValueError(f"the ensemble has no {method!r} threshold ({notes}); choose another --threshold-method, "
                         "e.g. percentile_95")
    return float(value)
