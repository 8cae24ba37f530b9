"""Learning-rate schedules: warm-up + cosine sized in optimiser steps (step it with
``OptimizerSpec(interval="step")``), and decays at fractions of the epochs (``interval="epoch"``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def warm_cosine_factor(step: int, total: int, warmup: int, final_ratio: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up from 0 to 1 over the first ``warmup`` steps (reaching 1 at step
    ``warmup - 1``), then a half cosine from 1 down to ``final_ratio`` over the remaining steps;
    ``final_ratio`` from step ``total`` on. ``warmup`` is capped at ``total``.
    """
    warmup = min(max(int(warmup), 0), total)
    if step >= total:
        return final_ratio
    if step < warmup:
        return step / (warmup - 1) if warmup > 1 else 1.0
    decay = step - warmup
    span = max(total - warmup, 1)
    return final_ratio + 0.5 * (1.0 - final_ratio) * (1.0 + math.cos(math.pi * decay / span))


def warm_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int,
                final_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following :func:`warm_cosine_factor` for every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warm_cosine_factor(step, int(total), int(warmup), float(final_ratio)))


def epoch_milestones(optimizer: torch.optim.Optimizer, num_epochs: int, fractions: Sequence[float],
                     gamma: float) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply the learning rates by ``gamma`` at each fraction of ``num_epochs`` (per-epoch steps;
    every milestone at least epoch 1)."""
    milestones = sorted({max(int(f * num_epochs), 1) for f in fractions})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
