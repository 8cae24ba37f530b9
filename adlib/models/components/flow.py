"""Normalising-flow building blocks on FrEIA (Ardizzone et al., "Framework for Easily Invertible
Architectures"): affine coupling blocks over 2D feature maps with convolutional subnets, and
conditional coupling blocks over feature vectors ("fibers"); likelihood maps and checks shared
by the flow models.

FrEIA's ``AllInOneBlock`` does an affine coupling with soft clamping, a global affine scaling and
a fixed random channel permutation; its parameters depend only on the channel count, so a flow
built here runs on feature maps of any spatial size.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

from adlib.models.components.maps import upsample_map
from adlib.training import NonFiniteLossError


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


def gaussian_nll(z: torch.Tensor | Sequence[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood under a standard normal latent, up to a constant:
    ``0.5 * sum(z^2) - log|det J|`` (float32, ``[B]``); ``z`` may be a list of one flow's latents
    (one per scale), summed over all of them."""
    latents = [z] if isinstance(z, torch.Tensor) else list(z)
    return 0.5 * sum(x.float().square().flatten(1).sum(dim=1) for x in latents) - log_jac_det.float()


def fc_subnet(in_features: int, out_features: int) -> nn.Module:
    """Subnet ``Linear(in, 2 in) - ReLU - Linear(2 in, out)`` of CFlow's fiber couplings."""
    return nn.Sequential(nn.Linear(in_features, 2 * in_features), nn.ReLU(), nn.Linear(2 * in_features, out_features))


def conditional_fiber_flow(channels: int, condition_dims: int, blocks: int, *, clamp: float = 1.9,
                           permute_soft: bool = False) -> Ff.SequenceINN:
    """A flow of ``blocks`` conditional coupling blocks on ``channels``-dim vectors, every subnet
    seeing the ``condition_dims``-dim condition beside its half of the vector (CFlow).

    Call it as ``flow(x, c=[condition])`` with ``x`` ``[N, channels]`` and ``condition``
    ``[N, condition_dims]``; it returns ``(z, log_jac_det)`` with ``log_jac_det`` ``[N]``.
    """
    if blocks < 1:
        raise ValueError(f"coupling_blocks must be >= 1; got {blocks}")
    flow = Ff.SequenceINN(channels)
    for _ in range(blocks):
        flow.append(Fm.AllInOneBlock, cond=0, cond_shape=(condition_dims,), subnet_constructor=fc_subnet,
                    affine_clamping=clamp, global_affine_type="SOFTPLUS", permute_soft=permute_soft)
    return flow


def log_likelihood_per_dim(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """``log p(x) / D`` of ``[N, D]`` latents under a standard normal: the per-dimension
    log-likelihood CFlow trains and scores with (float32, ``[N]``)."""
    dims = z.shape[1]
    log_p = -0.5 * dims * math.log(2 * math.pi) - 0.5 * z.float().square().sum(dim=1) + log_jac_det.float()
    return log_p / dims


def likelihood_map(latents: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """``1 - mean over latents of exp(-0.5 * mean_c z^2)``, each upsampled to ``size``: the anomaly
    map of FastFlow and U-Flow (the negative likelihood shifted into [0, 1]); ``[B, H, W]``."""
    probs = [upsample_map(torch.exp(-0.5 * z.float().square().mean(dim=1)), size) for z in latents]
    return 1.0 - torch.stack(probs).mean(dim=0)


def check_finite_likelihood(values: torch.Tensor, where: str, lr: float, keep: str = "amp=False") -> None:
    """Raise :class:`~adlib.training.NonFiniteLossError` naming the first NaN/inf value of a
    log-likelihood, how many positions have one, and what to use instead: a learning rate below
    the model's ``lr``, the settings in ``keep``, or clean images."""
    finite = torch.isfinite(values.detach())
    if bool(finite.all()):
        return
    bad = values.detach()[~finite]
    raise NonFiniteLossError(
        f"{where}: the log-likelihood is {bad.flatten()[0].item()} at {bad.numel()} of {values.numel()} positions, "
        f"so no anomaly score can be computed. Train with a lower learning rate than lr={lr:g} (e.g. "
        f"lr={lr / 10:g}), keep {keep}, or check the images for NaN/inf pixels.")
