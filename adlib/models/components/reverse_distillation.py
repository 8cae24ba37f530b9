"""Reverse distillation building blocks: the one-class bottleneck (OCBE) and the reverse decoder.

Deng and Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022.
A frozen teacher encoder gives a feature pyramid (e.g. Wide-ResNet-50-2 layer1..layer3). The
:class:`OneClassBottleneck` brings every level to the deepest one's grid with stride-2 3x3
convolutions, concatenates them and compresses the result with one residual stage (stride 2)
into a compact embedding; the :class:`ReverseDecoder` mirrors the encoder: one upsampling
residual stage per level, deepest first, each reproducing one teacher feature map.

Both are written for any pyramid whose levels double the stride (channels ``c_1 .. c_L``); with
Wide-ResNet-50-2's ``(256, 512, 1024)``, ``width_ratio=0.5`` and blocks ``3`` / ``(3, 4, 6)`` they
have the paper's shapes (embedding 2048 channels at stride 32, block widths 1024 / 512 / 256 /
128). UniNet reuses both, with its own residual block in the bottleneck.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: builds a residual block: (in_channels, width, out_channels, stride) -> module
BlockFactory = Callable[[int, int, int, int], nn.Module]


def block_width(out_channels: int, ratio: float) -> int:
    """Inner width of a bottleneck block: ``ratio * out_channels``, rounded to an even number
    (blocks that split their channels in two need it), at least 2."""
    return max(2, 2 * round(out_channels * ratio / 2))


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias, 'same' padding) followed by batch normalisation."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


def deconv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x2 transposed convolution with stride 2 (doubles the grid) and batch normalisation."""
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
                         nn.BatchNorm2d(out_channels))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride)


class ResidualBottleneck(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 with the stride -> 1x1, projection shortcut when the
    shape changes)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(in_channels, width, 1), nn.ReLU(inplace=True),
                                  conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                  conv_bn(width, out_channels, 1))
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class UpsamplingBottleneck(nn.Module):
    """The decoder's mirror of :class:`ResidualBottleneck`: with ``stride=2`` the middle 3x3
    convolution becomes a 2x2 transposed convolution that doubles the grid, and so does the
    shortcut."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"UpsamplingBottleneck upsamples by 1 or 2; got stride {stride}")
        middle = deconv_bn(width, width) if stride == 2 else conv_bn(width, width, 3)
        self.body = nn.Sequential(conv_bn(in_channels, width, 1), nn.ReLU(inplace=True),
                                  middle, nn.ReLU(inplace=True), conv_bn(width, out_channels, 1))
        self.shortcut = (deconv_bn(in_channels, out_channels) if stride == 2
                         else _shortcut(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def residual_stage(block: BlockFactory, in_channels: int, out_channels: int, blocks: int, stride: int,
                   width_ratio: float) -> nn.Sequential:
    """``blocks`` residual blocks; the first changes the stride and the channels."""
    if blocks < 1:
        raise ValueError(f"a residual stage needs at least one block; got {blocks}")
    width = block_width(out_channels, width_ratio)
    return nn.Sequential(block(in_channels, width, out_channels, stride),
                         *(block(out_channels, width, out_channels, 1) for _ in range(blocks - 1)))


def init_resnet_style_(module: nn.Module) -> nn.Module:
    """torchvision's ResNet initialisation: Kaiming-normal (fan-out) convolutions, batch norms
    with weight 1 and bias 0 (transposed convolutions keep PyTorch's default, as in the paper's code)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def check_pyramid(layers: Sequence[str], reductions: Sequence[int], model: str) -> None:
    """Reverse distillation needs at least two levels, each at twice the previous one's stride."""
    doubling = all(b == 2 * a for a, b in zip(reductions, reductions[1:]))
    if len(reductions) < 2 or not doubling:
        raise ValueError(f"{model} needs at least two teacher layers, each at twice the stride of the previous one "
                         f"(e.g. layer1, layer2, layer3); layers {list(layers)} have strides {list(reductions)}")


class OneClassBottleneck(nn.Module):
    """Multi-scale fusion plus one residual stage: the one-class embedding (OCBE).

    ``channels``: teacher channels, shallow to deep. Level ``i`` reaches the deepest grid
    through stride-2 3x3 convolutions ``c_i -> c_{i+1} -> ... -> c_L`` (each with batch norm
    and ReLU); the concatenation (``L * c_L`` channels) goes through ``blocks`` residual blocks
    (``block``, first one with stride 2) to ``2 * c_L`` channels.
    """

    def __init__(self, channels: Sequence[int], *, blocks: int = 3, width_ratio: float = 0.5,
                 block: BlockFactory = ResidualBottleneck) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        self.fuse = nn.ModuleList(
            nn.Sequential(*(layer for a, b in zip(channels[i:], channels[i + 1:])
                            for layer in (*conv_bn(a, b, 3, 2), nn.ReLU(inplace=True))))
            for i in range(len(channels)))  # the deepest level passes unchanged (empty Sequential)
        self.out_channels = 2 * channels[-1]
        self.stage = residual_stage(block, len(channels) * channels[-1], self.out_channels, blocks, 2, width_ratio)
        init_resnet_style_(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.fuse):
            raise ValueError(f"OneClassBottleneck expects {len(self.fuse)} feature maps; got {len(features)}")
        return self.stage(torch.cat([fuse(f) for fuse, f in zip(self.fuse, features)], dim=1))


class ReverseDecoder(nn.Module):
    """Upsampling residual stages from the embedding back to every teacher level.

    ``channels``: teacher channels, shallow to deep; ``blocks``: blocks per stage, deepest
    stage first (Wide-ResNet-50-2's mirror: ``(3, 4, 6)``). Returns the reconstructed maps
    shallow to deep, like the teacher's.
    """

    def __init__(self, channels: Sequence[int], in_channels: int, *, blocks: Sequence[int] = (3, 4, 6),
                 width_ratio: float = 0.5) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(blocks) != len(channels):
            raise ValueError(f"decoder_blocks needs one block count per teacher layer ({len(channels)}); "
                             f"got {list(blocks)}")
        stages, previous = [], int(in_channels)
        for out, n in zip(reversed(channels), blocks):
            stages.append(residual_stage(UpsamplingBottleneck, previous, out, int(n), 2, width_ratio))
            previous = out
        self.stages = nn.ModuleList(stages)
        init_resnet_style_(self)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


def cosine_distance_map(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between teacher and student vectors at every position: ``[B, C, h, w]`` -> ``[B, h, w]``."""
    return 1.0 - F.cosine_similarity(teacher.float(), student.float(), dim=1)


__all__ = ["OneClassBottleneck", "ResidualBottleneck", "ReverseDecoder", "UpsamplingBottleneck", "block_width",
           "check_pyramid", "conv_bn", "cosine_distance_map", "init_resnet_style_", "residual_stage"]
