"""Gaussian kernel density estimation with a full bandwidth matrix from Scott's rule.

The kernel covariance is ``H = f^2 * Sigma`` with ``Sigma`` the data covariance and Scott's factor
``f = N^(-1 / (d + 4))`` (Scott, *Multivariate Density Estimation*, 1992), as in
``scipy.stats.gaussian_kde``. Densities are evaluated as log-likelihoods with a log-sum-exp over
the training points (float64, chunked), so they neither under- nor overflow.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GaussianKDE(nn.Module):
    def __init__(self, chunk_size: int = 4096) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.register_buffer("points", torch.empty(0, 0))  # whitened training points [N, d]
        self.register_buffer("whitener", torch.empty(0, 0))  # L^-1 with H = L L^T, [d, d]
        self.register_buffer("log_norm", torch.empty(0))  # log of the kernel's normalising constant * N

    @property
    def fitted(self) -> bool:
        return self.points.numel() > 0

    def fit(self, data: torch.Tensor) -> "GaussianKDE":
        """Fit on ``data`` ``[N, d]``; needs N >= 2 and a covariance that is not degenerate."""
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"GaussianKDE needs a [N, d] matrix with N >= 2; got shape {tuple(data.shape)}")
        x = data.detach().to(torch.float64)
        n, d = x.shape
        factor = n ** (-1.0 / (d + 4))
        cov = torch.cov(x.T).reshape(d, d)
        # a tiny ridge keeps the Cholesky factorisation alive for (nearly) flat directions
        ridge = 1e-10 * cov.diagonal().mean().clamp_min(1e-300)
        bandwidth = (cov + ridge * torch.eye(d, dtype=x.dtype, device=x.device)) * factor**2
        chol = torch.linalg.cholesky(bandwidth)
        whitener = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=x.dtype, device=x.device), upper=False)
        log_det = 2.0 * torch.log(chol.diagonal()).sum()
        self.whitener = whitener.contiguous()  # LAPACK output is column-major; reloads are row-major
        self.points = (x @ self.whitener.T).contiguous()
        self.log_norm = (0.5 * (d * math.log(2 * math.pi) + log_det) + math.log(n)).reshape(1)
        return self

    def log_density(self, data: torch.Tensor) -> torch.Tensor:
        """Log of the estimated density at each row of ``data`` ``[M, d]``: ``[M]`` (float32)."""
        if not self.fitted:
            raise RuntimeError("GaussianKDE is not fitted: call fit() (the model's finalize) before predicting")
        if data.shape[-1] != self.points.shape[1]:
            raise ValueError(f"GaussianKDE was fitted on {self.points.shape[1]}-dim data, got {data.shape[-1]}-dim")
        query = data.detach().to(torch.float64) @ self.whitener.T
        parts = []
        for start in range(0, self.points.shape[0], self.chunk_size):
            ref = self.points[start:start + self.chunk_size]
            parts.append(torch.logsumexp(-0.5 * torch.cdist(query, ref).square(), dim=1))
        total = torch.logsumexp(torch.stack(parts, dim=1), dim=1)
        return (total - self.log_norm).float()
