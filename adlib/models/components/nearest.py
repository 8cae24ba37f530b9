"""Exact k-nearest-neighbour search in blocks, so large memory banks never need a full
query x bank distance matrix."""
from __future__ import annotations

import torch

#: default size of one query x bank block of squared distances (float32 elements, 64 MiB)
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def squared_distances(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor | None = None,
                      b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, m]`` squared Euclidean distances via ``|a|^2 + |b|^2 - 2 a.b`` (clamped at 0).

    Always computed in the inputs' own precision, also inside an autocast region.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        if a_sq is None:
            a_sq = a.pow(2).sum(1)
        if b_sq is None:
            b_sq = b.pow(2).sum(1)
        d = torch.addmm(b_sq.unsqueeze(0), a, b.t(), alpha=-2.0)
        d.add_(a_sq.unsqueeze(1))
        return d.clamp_(min=0.0)


def nearest_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` for every row of ``queries``.

    Returns ``(distances, indices)``, both ``[Q, k]``, sorted nearest first; distances are
    Euclidean (not squared). Memory is bounded by ``block_elements`` distances at a time.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and bank {tuple(bank.shape)} must be "
                         "2-D with the same feature dimension")
    n_bank = bank.shape[0]
    if n_bank == 0:
        raise ValueError("nearest_neighbors: the memory bank is empty (was the model fitted?)")
    k = min(int(k), n_bank)
    queries = queries.to(bank.dtype)
    if queries.shape[0] == 0:
        return queries.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=queries.device)
    q_rows = max(1, min(queries.shape[0], block_elements // max(1, min(n_bank, 4096))))
    out_d, out_i = [], []
    for q0 in range(0, queries.shape[0], q_rows):
        q = queries[q0:q0 + q_rows]
        q_sq = q.pow(2).sum(1)
        b_rows = max(k, block_elements // q.shape[0])
        best_d = best_i = None
        for b0 in range(0, n_bank, b_rows):
            block = bank[b0:b0 + b_rows]
            d = squared_distances(q, block, a_sq=q_sq)
            kk = min(k, block.shape[0])
            if kk == 1:
                val, idx = d.min(dim=1, keepdim=True)
            else:
                val, idx = d.topk(kk, dim=1, largest=False)
            idx = idx + b0
            if best_d is None:
                best_d, best_i = val, idx
            else:
                val = torch.cat([best_d, val], dim=1)
                idx = torch.cat([best_i, idx], dim=1)
                keep = min(k, val.shape[1])
                best_d, pos = val.topk(keep, dim=1, largest=False, sorted=True)
                best_i = idx.gather(1, pos)
        out_d.append(best_d.sqrt())
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)
