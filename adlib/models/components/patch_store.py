"""CPU storage for the patch features a memory model collects before building its bank.

Each row is kept twice: the full feature (``dtype``, float16 by default: half the memory of
float32) and a low-dimensional float32 projection used to select the coreset. Both live in one
buffer each, so the coreset search reads the projections where they were written: with
``expected_rows`` (the rows the training images will give) the buffers are allocated once at
that size (untouched pages cost no memory), otherwise they double when full. With ``capacity``
set, a seeded reservoir sample (Vitter's algorithm R) keeps a uniform random subset of at most
``capacity`` rows, so memory stays bounded for any number of images.
"""
from __future__ import annotations

import torch


class PatchStore:
    def __init__(self, dtype: torch.dtype = torch.float16, capacity: int | None = None, seed: int = 0,
                 expected_rows: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of patches, got {capacity}")
        self.dtype = dtype
        self.capacity = capacity
        self.expected_rows = expected_rows
        self.seen = 0  # rows offered so far
        self._gen = torch.Generator().manual_seed(int(seed))
        self._full: torch.Tensor | None = None
        self._proj: torch.Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity) if self.capacity is not None else self.seen

    def add(self, features: torch.Tensor, projected: torch.Tensor) -> None:
        """Store ``[n, D]`` features and their ``[n, p]`` projections (any device)."""
        if features.shape[0] != projected.shape[0]:
            raise ValueError("features and projections must have the same number of rows")
        n = features.shape[0]
        if self._full is None:
            rows = self.capacity or max(self.expected_rows or 0, n)
            self._full = torch.empty(rows, features.shape[1], dtype=self.dtype)
            self._proj = torch.empty(rows, projected.shape[1], dtype=torch.float32)
        if self.capacity is not None:
            self._reservoir_add(features.detach().to("cpu", self.dtype), projected.detach().to("cpu", torch.float32))
            return
        self._make_room(self.seen + n)
        self._full[self.seen:self.seen + n].copy_(features.detach())  # converts dtype and device
        self._proj[self.seen:self.seen + n].copy_(projected.detach())
        self.seen += n

    def _make_room(self, rows: int) -> None:
        """Grow both buffers (at least doubling) to hold ``rows`` rows."""
        if rows <= self._full.shape[0]:
            return
        size = max(rows, 2 * self._full.shape[0])
        for name in ("_full", "_proj"):
            old = getattr(self, name)
            grown = old.new_empty(size, old.shape[1])
            grown[:self.seen] = old[:self.seen]
            setattr(self, name, grown)

    def _reservoir_add(self, full: torch.Tensor, proj: torch.Tensor) -> None:
        store_full, store_proj = self._full, self._proj
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
        """All kept projections, ``[len(self), p]`` float32 (a view of the store's buffer)."""
        if self._proj is None:
            raise ValueError("no patches were collected")
        return self._proj[:len(self)]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Full features of the kept rows ``indices`` (in that order), as float32."""
        if self._full is None:
            raise ValueError("no patches were collected")
        return self._full[:len(self)][indices.to("cpu", torch.long)].float()

    def clear(self) -> None:
        self._full = self._proj = None
        self.seen = 0
