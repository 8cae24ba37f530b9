"""Principal component analysis as a module whose fitted state lives in buffers.

Fitted by a thin SVD of the centred data (computed in float64 for stability). ``n_components``
is either a count (kept at most ``rank`` of the data) or a fraction in (0, 1): the smallest number
of components whose cumulative explained-variance ratio reaches it (as in scikit-learn).
Buffers start empty and take their data-dependent size on :meth:`fit` (or on load through
:meth:`adlib.models.base.AnomalyModel.load_saved_state`).
"""
from __future__ import annotations

import torch
from torch import nn


class PCA(nn.Module):
    def __init__(self, n_components: int | float) -> None:
        super().__init__()
        if isinstance(n_components, float) and not 0.0 < n_components <= 1.0:
            raise ValueError(f"a fractional n_components must lie in (0, 1]; got {n_components}")
        if isinstance(n_components, int) and n_components < 1:
            raise ValueError(f"n_components must be >= 1; got {n_components}")
        self.n_components = n_components
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0, 0))  # [k, D], orthonormal rows
        self.register_buffer("explained_variance", torch.empty(0))  # [k]

    @property
    def fitted(self) -> bool:
        return self.components.numel() > 0

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    def fit(self, data: torch.Tensor) -> "PCA":
        """Fit on ``data`` ``[N, D]`` (N >= 2)."""
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"PCA needs a [N, D] matrix with N >= 2 samples; got shape {tuple(data.shape)}")
        x = data.detach().to(torch.float64)
        mean = x.mean(dim=0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        variance = s.square() / (x.shape[0] - 1)
        # numerical rank: drop directions without variance (at most N - 1 after centring)
        tol = variance.max().clamp_min(1e-300) * max(x.shape) * torch.finfo(torch.float64).eps
        rank = max(int((variance > tol).sum()), 1)
        if isinstance(self.n_components, float):
            ratio = torch.cumsum(variance, 0) / variance.sum().clamp_min(1e-300)
            k = int(torch.searchsorted(ratio, torch.tensor(self.n_components, dtype=ratio.dtype))) + 1
        else:
            k = self.n_components
        k = min(k, rank)
        # contiguous copies: LAPACK returns column-major factors, and a reloaded model must run the
        # very same kernels to give bit-identical results
        device, dtype = data.device, torch.float32
        self.mean = mean.to(device, dtype).contiguous()
        self.components = vh[:k].to(device, dtype).contiguous()
        self.explained_variance = variance[:k].to(device, dtype).contiguous()
        return self

    def _check(self, data: torch.Tensor) -> None:
        if not self.fitted:
            raise RuntimeError("PCA is not fitted: call fit() (the model's finalize) before predicting")
        if data.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"PCA was fitted on {self.mean.shape[0]}-dim features but got {data.shape[-1]}-dim "
                             "features (was the image size or backbone changed after training?)")

    def transform(self, data: torch.Tensor) -> torch.Tensor:
        """Project ``[N, D]`` onto the components: ``[N, k]``."""
        self._check(data)
        return (data.float() - self.mean) @ self.components.T

    def inverse_transform(self, coords: torch.Tensor) -> torch.Tensor:
        """Map ``[N, k]`` component coordinates back to ``[N, D]``."""
        return coords @ self.components + self.mean

    def reconstruct(self, data: torch.Tensor) -> torch.Tensor:
        """Projection of ``data`` onto the principal subspace, in the original space."""
        return self.inverse_transform(self.transform(data))
