"""A fully convolutional cross-scale normalising flow (CS-Flow; Rudolph et al., WACV 2022).

The flow transforms a list of feature maps of one image at successive scales (each half the
side of the previous one) jointly. Each block permutes every map's channels in a fixed random
order, then applies two affine couplings (Glow style: the second half of the channels sets the
scale and shift of the first half, then the transformed first half those of the second), whose
subnets are *cross-convolutions*: every scale's coefficients come from its own scale and its
neighbours (the coarser one upsampled, the finer one through a strided convolution).

Scales are soft-clamped, ``log s = clamp * 0.636 * atan(s_raw / clamp)``, and the log-Jacobian
determinant is kept per sample (``[B]``, summed over scales and positions, never over the batch).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _fit(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                     align_corners=False)


class CrossConvolutions(nn.Module):
    """Subnet of a cross-scale coupling: ``len(xs)`` maps of ``in_channels`` -> maps of
    ``out_channels`` (the scales and shifts), each multiplied by a learned gate that starts at 0
    (so every block starts as the identity)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int, n_scales: int,
                 leaky_slope: float = 0.1) -> None:
        super().__init__()
        pad = kernel_size // 2

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=pad)

        self.inner = nn.ModuleList(conv(in_channels, hidden) for _ in range(n_scales))
        self.same = nn.ModuleList(conv(hidden, out_channels) for _ in range(n_scales))
        self.from_coarser = nn.ModuleList(conv(hidden, out_channels) for _ in range(n_scales - 1))
        self.from_finer = nn.ModuleList(conv(hidden, out_channels, stride=2) for _ in range(n_scales - 1))
        self.gates = nn.Parameter(torch.zeros(n_scales))
        self.act = nn.LeakyReLU(leaky_slope)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [self.act(conv(x)) for conv, x in zip(self.inner, xs)]
        outs = []
        for s, h in enumerate(hidden):
            out = self.same[s](h)
            if s + 1 < len(hidden):  # the coarser scale, upsampled to this one
                out = out + self.from_coarser[s](_fit(hidden[s + 1], h.shape[-2:]))
            if s > 0:  # the finer scale, through a strided convolution
                out = out + _fit(self.from_finer[s - 1](hidden[s - 1]), h.shape[-2:])
            outs.append(out * self.gates[s])
        return outs


class CrossScaleCoupling(nn.Module):
    """Two affine couplings over all scales at once; ``forward`` returns ``(ys, log_jac [B])``."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, clamp: float, n_scales: int) -> None:
        super().__init__()
        self.first, self.second = channels // 2, channels - channels // 2
        self.clamp = float(clamp)
        self.from_second = CrossConvolutions(self.second, 2 * self.first, hidden, kernel_size, n_scales)
        self.from_first = CrossConvolutions(self.first, 2 * self.second, hidden, kernel_size, n_scales)

    def _log_scale(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def _affine(self, subnet: CrossConvolutions, conditions: list[torch.Tensor], targets: list[torch.Tensor],
                inverse: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        out, log_jac = [], 0.0
        for params, x in zip(subnet(conditions), targets):
            raw, shift = params.split(x.shape[1], dim=1)
            log_s = self._log_scale(raw)
            out.append((x - shift) * torch.exp(-log_s) if inverse else x * torch.exp(log_s) + shift)
            log_jac = log_jac + log_s.flatten(1).sum(dim=1)
        return out, log_jac

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        x1 = [x[:, :self.first] for x in xs]
        x2 = [x[:, self.first:] for x in xs]
        y1, jac1 = self._affine(self.from_second, x2, x1, inverse=False)
        y2, jac2 = self._affine(self.from_first, y1, x2, inverse=False)
        return [torch.cat(pair, dim=1) for pair in zip(y1, y2)], jac1 + jac2

    def inverse(self, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        y1 = [y[:, :self.first] for y in ys]
        y2 = [y[:, self.first:] for y in ys]
        x2, _ = self._affine(self.from_first, y1, y2, inverse=True)
        x1, _ = self._affine(self.from_second, x2, y1, inverse=True)
        return [torch.cat(pair, dim=1) for pair in zip(x1, x2)]


class CrossScaleFlow(nn.Module):
    """``blocks`` x (fixed channel permutation per scale + :class:`CrossScaleCoupling`).

    The permutation of block ``k`` is drawn from a generator seeded with ``k`` and kept as a
    buffer, so a rebuilt flow is the same function after loading its weights.
    """

    def __init__(self, channels: int, n_scales: int = 3, blocks: int = 4, hidden: int = 1024,
                 kernel_sizes: Sequence[int] = (3, 3, 3, 5), clamp: float = 3.0) -> None:
        super().__init__()
        if len(kernel_sizes) != blocks:
            raise ValueError(f"need one kernel size per coupling block: {blocks} blocks, kernel sizes {kernel_sizes}")
        if n_scales < 1 or blocks < 1:
            raise ValueError(f"n_scales and coupling_blocks must be >= 1; got {n_scales} and {blocks}")
        self.n_scales = n_scales
        self.couplings = nn.ModuleList(CrossScaleCoupling(channels, hidden, int(k), clamp, n_scales)
                                       for k in kernel_sizes)
        for k in range(blocks):
            generator = torch.Generator().manual_seed(k)
            perms = torch.stack([torch.randperm(channels, generator=generator) for _ in range(n_scales)])
            self.register_buffer(f"perm_{k}", perms)

    def _perms(self, k: int) -> torch.Tensor:
        return getattr(self, f"perm_{k}")

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(zs, log_jac_det)``: latents per scale and the per-sample log-Jacobian ``[B]``."""
        if len(xs) != self.n_scales:
            raise ValueError(f"the flow was built for {self.n_scales} scales; got {len(xs)} feature maps")
        log_jac = torch.zeros(xs[0].shape[0], device=xs[0].device)
        for k, coupling in enumerate(self.couplings):
            perms = self._perms(k)
            xs, jac = coupling([x[:, perm] for x, perm in zip(xs, perms)])
            log_jac = log_jac + jac
        return xs, log_jac

    def inverse(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for k in reversed(range(len(self.couplings))):
            zs = self.couplings[k].inverse(zs)
            zs = [z[:, torch.argsort(perm)] for z, perm in zip(zs, self._perms(k))]
        return list(zs)
