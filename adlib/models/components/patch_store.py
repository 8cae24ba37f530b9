"""CPU storage for the patch features a memory model collects before building its bank.

Each row is kept twice: the full feature (``dtype``, float16 by default: half the memory of
float32) and a low-dimensional float32 projection used to select the coreset. With
``capacity`` set, a seeded reservoir sample (Vitter's algorithm R) keeps a uniform random
subset of at most ``capacity`` rows, so memory stays bounded for any number of images.
"""
from __future__ import annotations

import torch


class PatchStore:
    def __init__(self, dtype: torch.dtype = torch.float16, capacity: int | None = None, seed: int = 0) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of patches, got {capacity}")
        self.dtype = dtype
        self.capacity = capacity
        self.seen = 0  # rows offered so far
        self._gen = torch.Generator().manual_seed(int(seed))
        self._full: list[torch.Tensor] = []
        self._proj: list[torch.Tensor] = []

    def __len__(self) -> int:
        return min(self.seen, self.capacity) if self.capacity is not None else self.seen

    def add(self, features: torch.Tensor, projected: torch.Tensor) -> None:
        """Store ``[n, D]`` features and their ``[n, p]`` projections (any device)."""
        if features.shape[0] != projected.shape[0]:
            raise ValueError("features and projections must have the same number of rows")
        full = features.detach().to("cpu", self.dtype)
        proj = projected.detach().to("cpu", torch.float32)
        if self.capacity is None:
            self._full.append(full)
            self._proj.append(proj)
            self.seen += full.shape[0]
            return
        if not self._full:  # preallocate once; untouched pages cost no memory
            self._full = [torch.empty(self.capacity, full.shape[1], dtype=self.dtype)]
            self._proj = [torch.empty(self.capacity, proj.shape[1], dtype=torch.float32)]
        self._reservoir_add(full, proj)

    def _reservoir_add(self, full: torch.Tensor, proj: torch.Tensor) -> None:
        store_full, store_proj = self._full[0], self._proj[0]
        n = full.shape[0]
        fill = max(0, min(n, self.capacity - self.seen))
        if fill:
            store_full[self.seen:self.seen + fill] = full[:fill]
            store_proj[self.seen:self.seen + fill] = proj[:fill]
        rest = n - fill
        if rest:
            # row with stream position t replaces slot j ~ U{0..t} when j < capacity
            positions = torch.arange(self.seen + fill, self.seen + n, dtype=torch.float64)
            slots = (torch.rand(rest, generator=self._gen, dtype=torch.float64) * (positions + 1)).long()
            hit = torch.nonzero(slots < self.capacity).squeeze(1)
            if hit.numel():
                # several rows may hit one slot: the last one wins, as in the sequential algorithm
                hit_slots = slots[hit]
                last = torch.full((self.capacity,), -1, dtype=torch.long)
                last.scatter_reduce_(0, hit_slots, hit, reduce="amax")
                winners = last[hit_slots]
                keep = winners == hit
                rows, target = fill + hit[keep], hit_slots[keep]
                store_full[target] = full[rows]
                store_proj[target] = proj[rows]
        self.seen += n

    def projected(self) -> torch.Tensor:
        """All kept projections, ``[len(self), p]`` float32."""
        if not self._proj:
            raise ValueError("no patches were collected")
        if self.capacity is not None:
            return self._proj[0][:len(self)]
        if len(self._proj) > 1:  # consolidate once, freeing the pieces
            self._proj = [torch.cat(self._proj)]
        return self._proj[0]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Full features of the kept rows ``indices`` (in that order), as float32."""
        if not self._full:
            raise ValueError("no patches were collected")
        indices = indices.to("cpu", torch.long)
        if self.capacity is not None or len(self._full) == 1:
            return self._full[0][indices].float()
        sizes = torch.tensor([c.shape[0] for c in self._full])
        starts = torch.cumsum(sizes, 0) - sizes
        chunk_of = torch.searchsorted(starts, indices, right=True) - 1
        out = torch.empty(indices.numel(), self._full[0].shape[1], dtype=torch.float32)
        for c in torch.unique(chunk_of).tolist():
            where = torch.nonzero(chunk_of == c).squeeze(1)
            out[where] = self._full[c][indices[where] - starts[c]].float()
        return out

    def clear(self) -> None:
        self._full, self._proj = [], []
        self.seen = 0
