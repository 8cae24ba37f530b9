"""CoordConv (Liu et al., "An intriguing failing of convolutional neural networks and the
CoordConv solution", NeurIPS 2018): a convolution that also sees each position's coordinates."""
from __future__ import annotations

import torch
from torch import nn


def coordinate_channels(batch: int, height: int, width: int, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | None = None) -> torch.Tensor:
    """``[B, 2, H, W]``: the row and the column of every position, each scaled to [-1, 1]."""
    rows = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device) if height > 1 else \
        torch.full((1,), -1.0, dtype=dtype, device=device)
    cols = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device) if width > 1 else \
        torch.full((1,), -1.0, dtype=dtype, device=device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, 2, height, width)


class CoordConv2d(nn.Module):
    """``Conv2d`` over the input with its two coordinate channels appended."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size, **conv_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.conv(torch.cat([x, coordinate_channels(b, h, w, dtype=x.dtype, device=x.device)], dim=1))
