"""A-contrario detection on normalising-flow latents: U-Flow's unsupervised threshold
(Tailanian, Pardo, Musé, arXiv:2211.12353, 2022; the windowed binomial test of its first version).

Under the null hypothesis (a normal image) the latents of a well-trained flow are independent
standard normal variables, so each entry exceeds ``a = Phi^-1((1 + p) / 2)`` in magnitude (i.e.
``z^2`` exceeds the ``p``-quantile of a chi-square with one degree of freedom) with probability
``q = 1 - p``. Around every position, a window of ``n`` positions is tested: with ``x`` the
number of exceeding entries divided by the channel count, the window's probability under H0 is
``P(Binomial(n, q) >= ceil(x))``. The windows of the coarser scales shrink with them (half the
side per scale, at least 3x3); their log-probabilities are upsampled to the finest latent grid
and added (the scales are independent under H0). With ``N`` tests (all latent positions),

    log10 NFA = log10 N + sum over scales of log10 P,

and a position is a detection at ``NFA <= 1``: on normal images less than one false detection is
expected. Windows are cut at the border (their ``n`` shrinks) instead of padding with mirrored
values, so no position is counted twice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from adlib.models.components.maps import upsample_map


def binomial_log10_tail(n_max: int, q: float) -> torch.Tensor:
    """``T[n, k] = log10 P(Binomial(n, q) >= k)`` for ``0 <= k <= n <= n_max`` (float64;
    ``-inf`` where ``k > n``)."""
    n = torch.arange(n_max + 1, dtype=torch.float64).view(-1, 1)
    j = torch.arange(n_max + 1, dtype=torch.float64).view(1, -1)
    log_pmf = (torch.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma((n - j).clamp_min(0) + 1)
               + j * math.log(q) + (n - j) * math.log1p(-q))
    log_pmf = log_pmf.masked_fill(j > n, -math.inf)
    tail = torch.logcumsumexp(log_pmf.flip(1), dim=1).flip(1)  # log P(X >= k)
    return tail / math.log(10.0)


def window_half_sides(window: int, n_scales: int) -> list[int]:
    """Half-sides of the test windows per scale: ``window`` at the finest, halved per scale, >= 1."""
    return [max(int(window / 2 ** s) // 2, 1) for s in range(n_scales)]


def check_nfa_options(window: int, probability: float) -> None:
    """Refuse a window side below 1 or a probability outside (0, 1), naming the defaults."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"nfa_probability must be in (0, 1) (default 0.5); got {probability}")
    if window < 1:
        raise ValueError(f"nfa_window must be >= 1 (default 7); got {window}")


def log10_nfa(latents: Sequence[torch.Tensor], window: int = 7, probability: float = 0.5) -> torch.Tensor:
    """``log10 NFA`` ``[B, h, w]`` on the finest latent grid (``latents[0]``), from latents
    ``[B, C_s, h_s, w_s]`` ordered finest first."""
    check_nfa_options(window, probability)
    bound = float(torch.special.ndtri(torch.tensor((1.0 + probability) / 2.0, dtype=torch.float64)))
    halves = window_half_sides(window, len(latents))
    table = binomial_log10_tail((2 * max(halves) + 1) ** 2, 1.0 - probability).to(latents[0].device)
    size = latents[0].shape[-2:]
    total = torch.zeros(latents[0].shape[0], *size, dtype=torch.float64, device=latents[0].device)
    for z, half in zip(latents, halves):
        side = 2 * half + 1
        exceed = (z.detach().float().abs() > bound).sum(dim=1, keepdim=True).to(torch.float64)  # [B, 1, h, w]
        window_sum = (F.avg_pool2d(exceed, side, stride=1, padding=half) * side * side).round().long()
        inside = (F.avg_pool2d(torch.ones_like(exceed[:1]), side, stride=1, padding=half) * side * side).round().long()
        channels = z.shape[1]
        least = (window_sum + channels - 1) // channels  # ceil(exceedances / channels)
        log_p = table[inside.expand_as(least), least][:, 0]
        total = total + upsample_map(log_p, size)
    tests = sum(z.shape[-2] * z.shape[-1] for z in latents)
    return total + math.log10(tests)
