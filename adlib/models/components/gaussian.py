"""Per-position multivariate Gaussians (PaDiM) fitted from streamed batches, and the
Mahalanobis distance to them."""
from __future__ import annotations

import torch

#: positions handled at once: covariances inverted in float64 (100-d features: 10 MiB),
#: Mahalanobis temporaries (``POSITION_BLOCK x batch x D`` float32)
POSITION_BLOCK = 128


class PositionGaussianAccumulator:
    """Running sums for one Gaussian per spatial position, in bounded memory.

    Feed position-major ``[P, B, D]`` batches (``P`` positions, ``B`` images, ``D`` features;
    see :func:`~adlib.models.components.features.position_major_embedding`) with :meth:`add`; memory is
    ``P x D x D`` floats whatever the number of images. Sums are taken around a shift (the
    first batch's mean), which keeps the one-pass covariance accurate even in float32; the
    final statistics are computed in float64.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        if features.ndim != 3:
            raise ValueError(f"expected [P, B, D] features, got shape {tuple(features.shape)}")
        x = features.float()
        if self._shift is None:
            self._shift = x.mean(dim=1)
            p, d = self._shift.shape
            self._sum = torch.zeros(p, d, device=x.device)
            self._outer = torch.zeros(p, d, d, device=x.device)
        elif (x.shape[0], x.shape[2]) != tuple(self._shift.shape):
            raise ValueError(f"feature shape {(x.shape[0], x.shape[2])} differs from the first batch's "
                             f"{tuple(self._shift.shape)}: all training images must have the same size")
        centred = (x - self._shift.unsqueeze(1)).contiguous()  # [P, B, D]; contiguous: 3x faster bmm
        self._sum += centred.sum(dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            self._outer.baddbmm_(centred.transpose(1, 2), centred)
        self.count += x.shape[1]

    def mean(self) -> torch.Tensor:
        """``[P, D]`` mean (float32)."""
        self._require(1)
        return (self._shift.double() + self._sum.double() / self.count).float()

    def covariance(self, eps: float = 0.0, positions: slice = slice(None)) -> torch.Tensor:
        """``[P, D, D]`` unbiased covariance plus ``eps * I`` (float64) of ``positions`` (all)."""
        self._require(2)
        mean_shifted = self._sum[positions].double() / self.count
        cov = self._outer[positions].double()
        cov -= self.count * mean_shifted.unsqueeze(2) * mean_shifted.unsqueeze(1)
        cov /= self.count - 1
        if eps:
            cov.diagonal(dim1=1, dim2=2).add_(eps)
        return cov

    def inverse_covariance(self, eps: float, block: int = POSITION_BLOCK) -> torch.Tensor:
        """``[P, D, D]`` inverse of the regularised covariance (float32), computed in float64
        ``block`` positions at a time: the float64 temporaries stay a few MiB instead of
        several times the ``[P, D, D]`` sums."""
        self._require(2)
        p, d = self._shift.shape
        out = torch.empty(p, d, d, device=self._outer.device)
        for start in range(0, p, block):
            rows = slice(start, min(start + block, p))
            out[rows] = torch.linalg.inv(self.covariance(eps, rows))
        return out

    def _require(self, minimum: int) -> None:
        if self.count < minimum:
            raise ValueError(f"need at least {minimum} training image(s) to fit the Gaussians, got {self.count}")


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor,
                block: int = POSITION_BLOCK) -> torch.Tensor:
    """Mahalanobis distance of position-major ``[P, B, D]`` features to per-position Gaussians
    -> ``[B, P]`` (float32, also inside an autocast region). Positions are taken ``block`` at a
    time, so the temporaries are ``block x B x D``, not three more copies of the features."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        squared = torch.empty(features.shape[:2], dtype=torch.float32, device=features.device)  # [P, B]
        for start in range(0, features.shape[0], block):
            part = slice(start, start + block)
            delta = (features[part].float() - mean[part].float().unsqueeze(1)).contiguous()  # [p, B, D]
            weighted = torch.bmm(delta, inv_covariance[part].float())
            squared[part] = (weighted * delta).sum(-1)
        return squared.clamp_(min=0.0).sqrt_().transpose(0, 1)
