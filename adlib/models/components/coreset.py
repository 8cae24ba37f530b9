"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022, Sec. 3.2) and the random
projection it runs on.

The plain greedy loop adds, one at a time, the point farthest from the centres chosen so far,
then updates every point's distance to its nearest centre: one pass over all ``N`` points per
centre, memory-bound and slow (``N x d`` floats read for each of ``k`` centres).

:func:`greedy_coreset` makes the same choices with far fewer passes. After each full pass the
``m`` points with the largest current distance are kept as *candidates*; everything else is at
most ``T``, the ``(m+1)``-th largest distance, and distances only ever shrink. Centres are
then picked among the candidates only, updating just the candidates' distances, for as long
as the best candidate is still strictly above ``T`` (then it is provably the global farthest
point). The skipped distance updates for all ``N`` points are applied afterwards in one
blocked matrix product against all new centres (compute-bound, cache-friendly). Ties are
broken towards the lowest index, as ``argmax`` does in the plain loop.
"""
from __future__ import annotations

import math

import torch

from adlib.models.components.nearest import squared_distances

#: squared-distance elements per block of the full update pass (float32: 4 MiB, cache-sized: 1.3x
#: faster than 32 MiB blocks on 2 cores)
_BLOCK_ELEMENTS = 1 << 20


def gaussian_projection(in_dim: int, out_dim: int, seed: int = 0, *, device: torch.device | None = None
                        ) -> torch.Tensor:
    """A seeded ``[in_dim, out_dim]`` Gaussian Johnson-Lindenstrauss projection (``x @ P``)."""
    gen = torch.Generator().manual_seed(int(seed))
    matrix = torch.randn(in_dim, out_dim, generator=gen) / math.sqrt(out_dim)
    return matrix.to(device) if device is not None else matrix


def start_index(num_points: int, seed: int = 0) -> int:
    """The seeded random first centre of the greedy selection."""
    gen = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(num_points, (1,), generator=gen).item())


def greedy_coreset(points: torch.Tensor, num_select: int, *, seed: int = 0, max_candidates: int = 1024,
                   block_elements: int = _BLOCK_ELEMENTS) -> torch.Tensor:
    """Indices (in selection order) of a greedy k-center coreset of the rows of ``points``.

    Equivalent to: start at :func:`start_index` ``(N, seed)``; repeat ``argmax`` of each point's
    squared distance to its nearest selected point (selected points excluded). Runs on
    ``points``' device; ``points`` is not modified.
    """
    if points.ndim != 2:
        raise ValueError(f"greedy_coreset expects [N, d] points, got shape {tuple(points.shape)}")
    n = points.shape[0]
    if not 0 < num_select <= n:
        raise ValueError(f"cannot select {num_select} of {n} points")
    x = points.float()
    x = x - x.mean(dim=0, keepdim=True)  # distances are shift-invariant; centring limits rounding
    sq = x.pow(2).sum(1)
    min_d = torch.full((n,), math.inf, device=x.device)
    selected = [start_index(n, seed)]
    _update(min_d, x, sq, selected, block_elements)
    candidates = min(max_candidates, n)
    while len(selected) < num_select:
        new = _pick_among_candidates(min_d, x, sq, candidates, num_select - len(selected))
        selected.extend(new)
        _update(min_d, x, sq, new, block_elements)
        # adapt the candidate pool: large when most candidates get picked, small otherwise
        if len(new) * 2 >= candidates:
            candidates = min(candidates * 2, max_candidates, n)
        elif len(new) * 8 < candidates:
            candidates = max(candidates // 2, 16)
    return torch.tensor(selected, dtype=torch.long)


def _pick_among_candidates(min_d: torch.Tensor, x: torch.Tensor, sq: torch.Tensor, m: int,
                           budget: int) -> list[int]:
    """Greedy picks that are provably global maxima, using only the top-``m`` candidates."""
    n = min_d.shape[0]
    first = int(torch.argmax(min_d))  # always exact: the current global farthest point
    picks = [first]
    m = min(m, n)
    if budget == 1 or m < 2:
        return picks
    values, idx = torch.topk(min_d, min(m + 1, n))
    threshold = values[m].item() if values.numel() > m else -math.inf
    idx = idx[:m].sort().values  # index order, so argmax breaks ties towards the lowest index
    cand_d = min_d[idx].clone()
    cand_x, cand_sq = x[idx], sq[idx]
    centre = first
    while len(picks) < budget:
        d = squared_distances(cand_x, x[centre:centre + 1], a_sq=cand_sq, b_sq=sq[centre:centre + 1])
        torch.minimum(cand_d, d.squeeze(1), out=cand_d)
        cand_d[idx == centre] = -math.inf
        j = int(torch.argmax(cand_d))
        if not cand_d[j].item() > threshold:
            break
        centre = int(idx[j])
        picks.append(centre)
    return picks


def _update(min_d: torch.Tensor, x: torch.Tensor, sq: torch.Tensor, centres: list[int],
            block_elements: int) -> None:
    """``min_d = min(min_d, squared distance to any of centres)``; centres get ``-inf``."""
    index = torch.tensor(centres, dtype=torch.long, device=x.device)
    c, c_sq = x[index], sq[index]
    rows = max(1, block_elements // len(centres))
    for r0 in range(0, x.shape[0], rows):
        d = squared_distances(x[r0:r0 + rows], c, a_sq=sq[r0:r0 + rows], b_sq=c_sq)
        torch.minimum(min_d[r0:r0 + rows], d.amin(dim=1), out=min_d[r0:r0 + rows])
    min_d[index] = -math.inf
