"""Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii, SODA 2007), on tensors."""
from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` squared Euclidean distances of rows ``x`` ``[N, D]`` to ``centres`` ``[K, D]``
    (clamped at 0 against rounding)."""
    return (x.square().sum(1, keepdim=True) + centres.square().sum(1) - 2.0 * x @ centres.T).clamp_min(0.0)


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 100, seed: int = 0, tol: float = 1e-6) -> torch.Tensor:
    """``k`` cluster centres ``[k, D]`` of the rows of ``x`` ``[N, D]``.

    Seeding draws from a CPU generator seeded by ``seed`` (the same centres on every machine);
    an emptied cluster keeps its previous centre.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({n}); got k={k}")
    gen = torch.Generator().manual_seed(int(seed))
    x = x.float()
    centres = x[int(torch.randint(n, (1,), generator=gen))].unsqueeze(0)
    nearest = squared_distances(x, centres)[:, 0]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        weights = nearest.cpu().double()
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=gen)) if weights.sum() > 0 else \
            int(torch.randint(n, (1,), generator=gen))
        centres = torch.cat([centres, x[pick:pick + 1]])
        nearest = torch.minimum(nearest, squared_distances(x, centres[-1:])[:, 0])
    for _ in range(iterations):
        assign = squared_distances(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        shift = (updated - centres).square().sum()
        centres = updated
        if shift <= tol:
            break
    return centres
