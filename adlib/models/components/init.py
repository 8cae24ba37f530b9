"""Deterministic re-initialisation of a network's weights."""
from __future__ import annotations

import torch
from torch import nn


def reinitialize_(module: nn.Module, seed: int) -> nn.Module:
    """Give ``module`` fresh random weights drawn with ``seed`` (in place; global RNG untouched).

    Convolutions: Kaiming normal (fan-out, ReLU), zero bias; normalisation layers: weight 1,
    bias 0, running statistics reset; other layers: their own ``reset_parameters``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                m.reset_parameters()
            elif m is not module and hasattr(m, "reset_parameters") and not list(m.children()):
                m.reset_parameters()
    return module


def normal_init_(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """DCGAN-style initialisation (Radford et al., ICLR 2016), as GANomaly's and DSR's code use:
    (transposed) convolution weights ``N(0, std)``, batch-norm scales ``N(1, std)`` and shifts 0
    with fresh running statistics; biases and other layers are left as they are."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=generator) * std)
                m.bias.zero_()
                m.reset_running_stats()
    return module
