"""Normalising-flow building blocks on FrEIA (Ardizzone et al., "Framework for Easily Invertible
Architectures"): affine coupling blocks over 2D feature maps with convolutional subnets.

FrEIA's ``AllInOneBlock`` does an affine coupling with soft clamping, a global affine scaling and
a fixed random channel permutation; its parameters depend only on the channel count, so a flow
built here runs on feature maps of any spatial size.
"""
from __future__ import annotations

from typing import Callable

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn


def conv_subnet(kernel_size: int, hidden_ratio: float) -> Callable[[int, int], nn.Module]:
    """Subnet constructor ``(in, out) -> conv-ReLU-conv`` with ``hidden_ratio * in`` hidden channels."""
    padding = kernel_size // 2

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(int(in_channels * hidden_ratio), 1)
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding=padding), nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding=padding))

    return build


def coupling_flow_2d(channels: int, flow_steps: int, *, conv3x3_only: bool = False, hidden_ratio: float = 1.0,
                     clamp: float = 2.0) -> Ff.SequenceINN:
    """A 2D flow of ``flow_steps`` coupling blocks whose subnets alternate 3x3 and 1x1 convolutions
    (3x3 only with ``conv3x3_only``), as in FastFlow (Yu et al., 2021).

    Call it on ``[B, channels, H, W]``; it returns ``(z, log_jac_det)`` with ``log_jac_det`` ``[B]``.
    """
    if flow_steps < 1:
        raise ValueError(f"flow_steps must be >= 1; got {flow_steps}")
    flow = Ff.SequenceINN(channels, 1, 1)  # spatial size is irrelevant to the blocks' parameters
    for step in range(flow_steps):
        kernel = 1 if (step % 2 == 1 and not conv3x3_only) else 3
        flow.append(Fm.AllInOneBlock, subnet_constructor=conv_subnet(kernel, hidden_ratio),
                    affine_clamping=clamp, permute_soft=False)
    return flow


def gaussian_nll(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood under a standard normal latent, up to a constant:
    ``0.5 * sum(z^2) - log|det J|`` (float32, ``[B]``)."""
    return 0.5 * z.float().square().flatten(1).sum(dim=1) - log_jac_det.float()
