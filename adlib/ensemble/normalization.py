"""Putting each model's scores (or anomaly maps) on a common scale before they are fused.

A :class:`Normalizer` is fitted on the values of *reference normal images* (the calibration
split's normal images when the runs have one) and then applied to any image, so a deployed
ensemble normalises a new image exactly as the report did:

* ``zscore``: ``(v - mean) / std`` of the reference values;
* ``minmax``: ``(v - min) / (max - min)`` of the reference values;
* ``rank``: the empirical distribution function of the reference values (piecewise linear
  through ``RANK_KNOTS`` quantiles): the share of reference normals scoring below ``v``, in
  [0, 1]. Values above every reference normal all map to 1, so with few reference normals the
  rank loses resolution among clear anomalies.

For maps the reference values are all pixels of the reference normal images' maps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

NORMALIZATIONS = ("zscore", "minmax", "rank")
#: quantiles that describe the reference distribution of the ``rank`` normalisation
RANK_KNOTS = 201
_TINY = 1e-12


def check_normalization(method: str) -> str:
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return method


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """One model's fitted normalisation (``params`` are plain floats, JSON-ready)."""

    method: str
    params: dict[str, Any]

    @classmethod
    def fit(cls, method: str, reference: Any) -> "Normalizer":
        check_normalization(method)
        ref = np.asarray(reference, dtype=np.float64).ravel()
        if ref.size == 0:
            raise ValueError(f"{method} normalisation needs reference normal images, got none")
        if method == "zscore":
            return cls(method, {"mean": float(ref.mean()), "std": float(ref.std())})
        if method == "minmax":
            return cls(method, {"low": float(ref.min()), "high": float(ref.max())})
        knots, probs = _distinct_knots(np.quantile(ref, np.linspace(0.0, 1.0, RANK_KNOTS)))
        return cls(method, {"values": knots.tolist(), "probs": probs.tolist()})

    def __call__(self, values: Any, dtype: Any = np.float64) -> np.ndarray:
        """Normalised copy of ``values`` (any shape) as ``dtype``."""
        v = np.asarray(values, dtype=dtype)
        p = self.params
        if self.method == "zscore":
            return (v - dtype(p["mean"])) / dtype(p["std"] if p["std"] > _TINY else 1.0)
        if self.method == "minmax":
            span = p["high"] - p["low"]
            return (v - dtype(p["low"])) / dtype(span if span > _TINY else 1.0)
        return np.interp(v, p["values"], p["probs"]).astype(dtype, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalizer":
        params = {k: v for k, v in data.items() if k != "method"}
        return cls(check_normalization(data["method"]), params)


def _distinct_knots(quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strictly increasing knots for ``np.interp``: a value repeated over several quantiles
    keeps one knot at the middle of their probabilities (ties get the mid-rank)."""
    probs = np.linspace(0.0, 1.0, quantiles.size)
    values, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
    return values, probs[first] + (counts - 1) / 2.0 * (probs[1] - probs[0] if probs.size > 1 else 0.0)
