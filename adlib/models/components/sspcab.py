"""SSPCAB: self-supervised predictive convolutional attentive block.

Ristea et al., "Self-Supervised Predictive Convolutional Attentive Block for Anomaly Detection"
(CVPR 2022). A masked convolution sees only four ``k x k`` corner regions of its receptive field,
at distance ``d`` from a hidden centre, and must predict the centre's features; a
squeeze-and-excitation stage (channel attention, reduction ``r``) rescales the result. The block
keeps the channel count and spatial size. Its self-supervised loss is the mean squared error
between the block's output and its input (:func:`sspcab_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SSPCAB(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 1, dilation: int = 1, reduction: int = 8) -> None:
        super().__init__()
        self.k, self.d = int(kernel_size), int(dilation)
        self.corners = nn.ModuleList(nn.Conv2d(channels, channels, self.k) for _ in range(4))
        hidden = max(channels // reduction, 1)
        self.excite = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def masked_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the four corner convolutions: position (i, j) sees only the four ``k x k`` regions
        that lie ``d + 1 .. d + k`` rows and columns away from it diagonally, never itself."""
        pad = self.k + self.d
        offset = self.k + 2 * self.d + 1  # from a corner region's start to the opposite corner's start
        padded = F.pad(x, (pad, pad, pad, pad))
        h, w = x.shape[-2:]
        out = 0
        for conv, (dy, dx) in zip(self.corners, ((0, 0), (0, 1), (1, 0), (1, 1))):
            y0, x0 = dy * offset, dx * offset
            out = out + conv(padded[..., y0:y0 + h + self.k - 1, x0:x0 + w + self.k - 1])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.masked_conv(x))
        weights = self.excite(out.mean(dim=(2, 3)))
        return out * weights[:, :, None, None]


def sspcab_loss(block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
    """Mean squared reconstruction error of the block (its self-supervised objective)."""
    return F.mse_loss(block_output.float(), block_input.float())
