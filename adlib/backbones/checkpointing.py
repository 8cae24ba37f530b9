"""Activation checkpointing for trainable backbones: keep each stage's input, recompute its
activations in the backward pass.

A trainable CNN keeps every intermediate activation of its forward pass for the backward one:
STFPM's Lite0 student at 32 images of 256 px holds several GB. Checkpointed stages keep only
their inputs and run their forward again, one stage at a time, during the backward pass: one
more forward per step for a fraction of the memory. The recomputation sees the same inputs,
weights and random state, so outputs and gradients are the same as without checkpointing; its
batch-norm layers compute the same batch statistics but do not update their running statistics
a second time (momentum 0 while recomputing), so a checkpointed network trains to the same
weights and running statistics as a plain one.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The stages of a timm feature network: the ``blocks`` of EfficientNet/MobileNet-style
    networks, the ``nn.Sequential`` children (ResNet ``layer1..4``) of the others."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return list(blocks)
    return [child for child in model.children() if isinstance(child, nn.Sequential)]


def checkpoint_stages(model: nn.Module) -> int:
    """Checkpoint every stage of ``model`` while it trains with gradients; returns how many.

    Stages keep their parameter names (the forward is replaced on the instance), so state
    dicts are unchanged. Without gradients (evaluation, ``torch.no_grad``) stages run as usual.
    """
    stages = stage_modules(model)
    for stage in stages:
        stage.forward = functools.partial(_checkpointed_forward, stage, stage.forward)
    return len(stages)


def _checkpointed_forward(stage: nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and stage.training):
        return forward(x)
    return checkpoint(forward, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_stats_held(stage)))


@contextlib.contextmanager
def _running_stats_held(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers of ``module`` leave their running statistics as they are (the
    recomputation of a checkpointed stage must not count its batch twice)."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
