"""Convolution blocks of the U-Net-style networks (DRAEM, DSR)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Norm = Callable[[int], nn.Module]


def conv_block(c_in: int, c_out: int, c_mid: int | None = None, norm: Norm = nn.BatchNorm2d) -> nn.Sequential:
    """conv3x3-norm-ReLU twice (``c_in -> c_mid -> c_out``; ``c_mid`` defaults to ``c_out``)."""
    c_mid = c_out if c_mid is None else c_mid
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), norm(c_mid), nn.ReLU(inplace=True),
                         nn.Conv2d(c_mid, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True))


def up_block(c_in: int, c_out: int, norm: Norm = nn.BatchNorm2d) -> nn.Sequential:
    """Bilinear x2 upsampling (corners aligned), then conv3x3-norm-ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(c_in, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net: :func:`conv_block` encoder stages of ``widths`` (a 2x max pooling before each but the
    first), then per decoder stage an :func:`up_block`, concatenation with the encoder map of the
    same size and a :func:`conv_block` to the next of ``decoder_widths``; a 3x3 convolution head.

    The up block keeps the width of the deeper map (DRAEM) or, with ``up_to_decoder_width``,
    already changes it to the stage's decoder width (DSR).
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], decoder_widths: Sequence[int],
                 norm: Norm = nn.BatchNorm2d, up_to_decoder_width: bool = False) -> None:
        super().__init__()
        if len(decoder_widths) != len(widths) - 1:
            raise ValueError(f"a U-Net with {len(widths)} encoder stages has {len(widths) - 1} decoder stages; "
                             f"got decoder_widths={list(decoder_widths)}")
        inputs = (in_channels, *widths[:-1])
        self.down = nn.ModuleList(conv_block(c_in, c_out, norm=norm) for c_in, c_out in zip(inputs, widths))
        ups, merges = [], []
        deeper = widths[-1]
        for skip, c_out in zip(widths[-2::-1], decoder_widths):
            c_up = c_out if up_to_decoder_width else deeper
            ups.append(up_block(deeper, c_up, norm=norm))
            merges.append(conv_block(c_up + skip, c_out, norm=norm))
            deeper = c_out
        self.ups, self.up_blocks = nn.ModuleList(ups), nn.ModuleList(merges)
        self.head = nn.Conv2d(deeper, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.up_blocks):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
