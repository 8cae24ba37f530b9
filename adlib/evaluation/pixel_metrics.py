"""Pixel-level metrics (pixel AUROC, AUPRO) streamed through fixed-size histograms.

Memory does not grow with the test set: :class:`PixelMetrics` keeps three histograms over one
common grid of ``num_bins`` score bins (normal-pixel counts, anomalous-pixel counts and the
per-region weighted anomalous counts that give PRO), whatever the number of images.

Threshold grid. Bins are uniform, ``[lo + k*w, lo + (k+1)*w)``. The first batch (or
``score_range``) sets ``lo`` and ``w``; when a later batch falls outside the grid, the grid
doubles its width (adjacent bins merged pairwise, the old content placed in the lower or upper
half) until it covers the batch. Merging is exact, so every pixel counted so far stays in the bin
it would have landed in on the coarser grid; at worst the final grid has ``num_bins / 4``
bins over the observed range. Pass ``score_range=(min, max)`` when the range is known (the
convenience functions do) to get the full resolution.

Accuracy. Thresholds are bin edges, so pixels in the same bin count as ties: the binned AUROC
equals the exact AUROC of the quantised scores, and differs from the exact value by at most
half the fraction of (anomalous, normal) pixel pairs that share a bin. With 4096 bins the
difference is typically below 1e-4 (see ``benchmarks/bench_pixel_metrics.py``). AUPRO is the
PRO-vs-FPR curve sampled at the bin edges; scores that fall into distinct bins give exactly the
exact curve. :func:`aupro_exact` is an unbinned reference for small sets.

AUPRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021): each connected
component (8-connectivity) of each ground-truth mask is one region; PRO(t) is the mean over all
regions of the fraction of the region's pixels scoring ``>= t``; FPR(t) is the fraction of all
normal pixels (every image, anomalous images included) scoring ``>= t``. The PRO-vs-FPR curve is
integrated (trapezoids, linearly interpolated at the limit) from FPR 0 to ``fpr_limit`` and
divided by ``fpr_limit``, so the result lies in [0, 1].
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from adlib.evaluation.metrics import as_numpy, auc_from_counts, trapezoid

DEFAULT_BINS = 4096
DEFAULT_FPR_LIMIT = 0.3
#: pixels binned at once inside ``update`` (bounds temporary memory to ~20 bytes x this)
CHUNK_PIXELS = 1 << 20
#: 8-connectivity inside each image, no connection across the batch axis
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True


def _check_maps_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """``maps`` -> float [B,H,W]; ``masks`` -> bool [B,H,W] (nonzero = anomalous)."""
    m = as_numpy(maps)
    g = as_numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim == 2:
        m = m[None]
    if g.ndim == 2:
        g = g[None]
    if m.ndim != 3:
        raise ValueError(f"anomaly maps must be [B,H,W] (or [B,1,H,W]), got shape {m.shape}")
    if m.shape != g.shape:
        raise ValueError(f"anomaly maps {m.shape} and masks {g.shape} differ in shape; "
                         "resize the maps to the mask resolution (or the masks to the maps) first")
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float32)
    if not np.isfinite(m).all():
        n_bad = int((~np.isfinite(m)).sum())
        raise ValueError(f"anomaly maps contain {n_bad} NaN/infinite values; check the model output")
    return m, g != 0


def _partial_area(fpr: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under ``y`` over ``fpr`` in [0, limit], divided by ``limit`` (fpr non-decreasing)."""
    i = int(np.searchsorted(fpr, limit, side="right"))
    area = trapezoid(y[:i], fpr[:i])
    if i < fpr.size:  # interpolate the segment that crosses the limit
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], y[i - 1], y[i]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_lim) / 2.0
    return float(np.clip(area / limit, 0.0, 1.0))


def _pro_curve_area(fps: np.ndarray, pro: np.ndarray, n_neg: int, limit: float) -> float:
    """AUPRO from cumulative normal-pixel counts and mean PRO, ordered by falling threshold."""
    fpr = np.r_[0.0, fps / n_neg]
    return _partial_area(fpr, np.r_[0.0, pro], limit)


class PixelMetrics:
    """Streaming pixel AUROC / AUPRO: ``update`` batch by batch, then ``compute``.

    >>> pm = PixelMetrics()
    >>> for maps, masks in batches:        # [B,H,W] float, [B,H,W] bool
    ...     pm.update(maps, masks)
    >>> pm.compute()                       # {"pixel_auroc", "pixel_aupro", "notes"}
    """

    def __init__(self, num_bins: int = DEFAULT_BINS, score_range: tuple[float, float] | None = None,
                 fpr_limit: float = DEFAULT_FPR_LIMIT):
        if num_bins < 16:
            raise ValueError(f"num_bins must be at least 16, got {num_bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.num_bins = int(num_bins) + int(num_bins) % 2  # even, so bins merge pairwise
        self.fpr_limit = float(fpr_limit)
        self.reset()
        if score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
                raise ValueError(f"score_range must be finite (min, max) with min <= max, got {score_range}")
            self._init_grid(lo, hi)

    def reset(self) -> None:
        n = self.num_bins
        self._lo: float | None = None
        self._width = 0.0
        self._normal = np.zeros(n, dtype=np.int64)
        self._anomalous = np.zeros(n, dtype=np.int64)
        self._region_weight = np.zeros(n, dtype=np.float64)  # sum of 1/|region| per pixel
        self.n_images = 0
        self.n_regions = 0
        self.n_images_with_anomalies = 0

    # -- grid ---------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[float, float] | None:
        """``(lo, bin_width)`` of the current grid, ``None`` before the first update."""
        return None if self._lo is None else (self._lo, self._width)

    @property
    def nbytes(self) -> int:
        """Memory held by the accumulator (constant, independent of the number of images)."""
        return self._normal.nbytes + self._anomalous.nbytes + self._region_weight.nbytes

    def _init_grid(self, lo: float, hi: float) -> None:
        self._lo = lo
        span = hi - lo
        if span <= 0:  # constant scores so far: any small width, the grid grows if needed
            span = max(abs(lo), 1.0) * 1e-6
        self._width = span / self.num_bins

    def _cover(self, lo: float, hi: float) -> None:
        """Grow the grid (doubling the bin width) until it covers [lo, hi]."""
        if self._lo is None:
            self._init_grid(lo, hi)
            return
        n = self.num_bins
        while lo < self._lo or hi > self._lo + n * self._width:
            down = lo < self._lo
            for name in ("_normal", "_anomalous", "_region_weight"):
                hist = getattr(self, name)
                merged = np.zeros_like(hist)
                pairs = hist.reshape(n // 2, 2).sum(axis=1)
                if down:
                    merged[n // 2:] = pairs
                else:
                    merged[: n // 2] = pairs
                setattr(self, name, merged)
            if down:
                self._lo -= n * self._width
            self._width *= 2.0

    def _bin_index(self, values: np.ndarray) -> np.ndarray:
        idx = values.astype(np.float64)  # a copy, then in place: two temporaries per chunk
        idx -= self._lo
        idx /= self._width
        np.floor(idx, out=idx)
        np.clip(idx, 0, self.num_bins - 1, out=idx)
        return idx.astype(np.intp)

    # -- accumulation ---------------------------------------------------------------------
    def update(self, maps: Any, masks: Any) -> None:
        """Add a batch: ``maps`` [B,H,W] float scores, ``masks`` [B,H,W] (nonzero = anomalous).

        Images with empty masks are fine: they only add normal pixels. Large batches are
        processed in chunks of about ``CHUNK_PIXELS`` pixels to bound temporary memory.
        """
        m, g = _check_maps_masks(maps, masks)
        if m.size == 0:
            return
        self._cover(float(m.min()), float(m.max()))
        step = max(1, CHUNK_PIXELS // (m.shape[1] * m.shape[2]))
        for start in range(0, m.shape[0], step):
            self._add(m[start:start + step], g[start:start + step])
        self.n_images += m.shape[0]

    def _add(self, m: np.ndarray, g: np.ndarray) -> None:
        n = self.num_bins
        idx = self._bin_index(m)
        self._normal += np.bincount(idx[~g], minlength=n)
        if not g.any():
            return
        self._anomalous += np.bincount(idx[g], minlength=n)
        regions, n_regions = ndimage.label(g, structure=_STRUCTURE_3D)
        sizes = np.bincount(regions.ravel())
        weights = 1.0 / sizes[regions[g]]
        self._region_weight += np.bincount(idx[g], weights=weights, minlength=n)
        self.n_regions += int(n_regions)
        self.n_images_with_anomalies += int(g.reshape(g.shape[0], -1).any(axis=1).sum())

    def _undefined_reason(self) -> str | None:
        n_anom = int(self._anomalous.sum())
        n_norm = int(self._normal.sum())
        if self.n_images == 0:
            return "no anomaly maps were given"
        if n_anom == 0:
            return f"no anomalous pixels in the ground-truth masks of {self.n_images} images"
        if n_norm == 0:
            return "no normal pixels in the ground-truth masks"
        return None

    def compute(self) -> dict[str, Any]:
        """``{"pixel_auroc", "pixel_aupro", "notes"}``; values are ``None`` with a note when undefined."""
        reason = self._undefined_reason()
        if reason:
            return {"pixel_auroc": None, "pixel_aupro": None,
                    "notes": [f"pixel_auroc: {reason}", f"pixel_aupro: {reason}"]}
        # cumulative counts from the highest bin down: threshold k predicts bins >= k anomalous
        tps = np.cumsum(self._anomalous[::-1])
        fps = np.cumsum(self._normal[::-1])
        pro = np.cumsum(self._region_weight[::-1]) / self.n_regions
        n_pos, n_neg = int(tps[-1]), int(fps[-1])
        return {
            "pixel_auroc": auc_from_counts(tps, fps, n_pos, n_neg),
            "pixel_aupro": _pro_curve_area(fps, np.minimum(pro, 1.0), n_neg, self.fpr_limit),
            "notes": [],
        }


def _stream(maps: Any, masks: Any, num_bins: int, fpr_limit: float, chunk: int = 32) -> dict[str, Any]:
    m, g = _check_maps_masks(maps, masks)
    score_range = (float(m.min()), float(m.max())) if m.size else None
    pm = PixelMetrics(num_bins=num_bins, score_range=score_range, fpr_limit=fpr_limit)
    for start in range(0, m.shape[0], chunk):
        pm.update(m[start:start + chunk], g[start:start + chunk])
    return pm.compute()


def pixel_auroc(maps: Any, masks: Any, num_bins: int = DEFAULT_BINS) -> float | None:
    """Binned pixel AUROC over all images; ``None`` without anomalous (or normal) pixels."""
    return _stream(maps, masks, num_bins, DEFAULT_FPR_LIMIT)["pixel_auroc"]


def aupro(maps: Any, masks: Any, fpr_limit: float = DEFAULT_FPR_LIMIT, num_bins: int = DEFAULT_BINS) -> float | None:
    """Binned AUPRO up to ``fpr_limit``, normalised to [0, 1]; ``None`` without regions."""
    return _stream(maps, masks, num_bins, fpr_limit)["pixel_aupro"]


def aupro_exact(maps: Any, masks: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float | None:
    """Unbinned AUPRO (every distinct score is a threshold). Reference for small sets:
    it sorts all pixels, so memory is O(pixels)."""
    m, g = _check_maps_masks(maps, masks)
    if not g.any() or g.all():
        return None
    regions, n_regions = ndimage.label(g, structure=_STRUCTURE_3D)
    sizes = np.bincount(regions.ravel())
    weight = np.zeros(m.shape, dtype=np.float64)
    weight[g] = 1.0 / sizes[regions[g]]
    s = m.ravel().astype(np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    fps = np.cumsum(~g.ravel()[order])[last]
    pro = np.cumsum(weight.ravel()[order])[last] / n_regions
    return _pro_curve_area(fps, np.minimum(pro, 1.0), int(fps[-1]), fpr_limit)
