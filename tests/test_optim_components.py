"""StableAdamW (update clipping) and the warm-up cosine schedule sized in optimiser steps."""
from __future__ import annotations

import math

import pytest
import torch

from adlib.models.components.schedules import warm_cosine, warm_cosine_factor
from adlib.models.components.stable_adamw import StableAdamW


def _trajectory(optimizer_cls, grads: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """Parameter values after each step with the given gradients (same start for every run)."""
    param = torch.nn.Parameter(torch.linspace(-1.0, 1.0, grads[0].numel()).view_as(grads[0]).clone())
    optimizer = optimizer_cls([param], **kwargs)
    out = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        out.append(param.detach().clone())
    return out


@pytest.mark.parametrize("amsgrad", [False, True])
def test_without_clipping_it_is_adamw(amsgrad):
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) * (1 + i) for i in range(6)]
    options = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    ours = _trajectory(StableAdamW, grads, clip_threshold=float("inf"), **options)
    reference = _trajectory(torch.optim.AdamW, grads, **options)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_gradient_far_above_its_running_estimate_is_clipped():
    """After quiet steps, a 100x gradient: AdamW's step is divided by RMS(g / denom) (about 2.4 here)."""
    grads = [torch.full((8,), 1e-3)] * 5 + [torch.full((8,), 1e-1)]
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ours = _trajectory(StableAdamW, grads, **options)
    adamw = _trajectory(torch.optim.AdamW, grads, **options)
    for a, b in zip(ours[:5], adamw[:5]):  # |g| / sqrt(v_hat) = 1 while the gradient is steady: no clipping
        torch.testing.assert_close(a, b)
    # the last step's bias-corrected second moment, recomputed here
    b2, step = 0.999, 6
    v = sum((1 - b2) * b2 ** (step - 1 - i) * g.square() for i, g in enumerate(grads))
    denom = (v / (1 - b2 ** step)).sqrt() + 1e-8
    rms = float((grads[-1] / denom).square().mean().sqrt())
    assert rms > 2
    adamw_step, our_step = adamw[-1] - adamw[-2], ours[-1] - ours[-2]
    torch.testing.assert_close(our_step, adamw_step / rms, rtol=1e-4, atol=1e-9)


def test_bad_options_are_refused():
    param = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="betas"):
        StableAdamW(param, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="clip_threshold"):
        StableAdamW(param, clip_threshold=0)


def test_warm_cosine_matches_the_papers_schedule():
    total, warmup, final = 20, 5, 0.1
    factors = [warm_cosine_factor(i, total, warmup, final) for i in range(total + 2)]
    assert factors[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # linear 0 -> 1 over 5 steps
    assert factors[5] == pytest.approx(1.0)
    for i in range(5, 20):  # cosine from 1 to final over the other 15
        assert factors[i] == pytest.approx(final + 0.5 * (1 - final) * (1 + math.cos(math.pi * (i - 5) / 15)))
    assert factors[20:] == [final, final]
    assert warm_cosine_factor(0, 2, 100, final) == 0.0 and warm_cosine_factor(1, 2, 100, final) == 1.0  # short fits


def test_warm_cosine_scheduler_steps_every_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 2.0}])
    scheduler = warm_cosine(optimizer, total=10, warmup=3, final_ratio=0.5)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == [0.0, 0.0] and seen[2] == pytest.approx([1.0, 2.0])
    assert seen[-1][1] == pytest.approx(2 * warm_cosine_factor(9, 10, 3, 0.5))
