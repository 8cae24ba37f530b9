"""Exact nearest memory item for many queries, with a bfloat16 prefilter on CPUs that have it.

PatchCore scores every test patch by its distance to the nearest of ~10^5 memory items:
``Q x N x D`` multiply-adds, ~14 TFLOP for one MVTec-sized category. On a CPU with bfloat16
dot-product instructions (AVX512-BF16, AMX) a bfloat16 matrix product runs 3-6x faster than a
float32 one, but its rounding could pick the wrong neighbour. :class:`BankSearch` uses it only
to *exclude* items, with a proven error bound, and decides among the survivors in float32:

* Coordinates are centred on the bank mean (distances are shift-invariant; smaller norms give
  smaller rounding errors). The bank is sorted by norm and cut into blocks, so each block's
  largest norm ``c_max`` bounds its items' errors tightly.
* For query ``q`` and item ``c`` the ranking key is ``v = |c|^2 - 2 q.c`` (``|q|^2`` is the
  same for every item). One bfloat16 product of ``[q, 1]`` with ``[-2c, |c|^2]`` gives ``v~``
  with ``|v~ - v| <= e = (6.5 |q| c_max + 2.5 c_max^2) u``, ``u = 2^-8``: inputs rounded to
  bfloat16 (``4u |q||c|`` for ``2 q.c``, ``u |c|^2``), float32 accumulation (negligible), the
  output rounded to bfloat16 (``u |v~|``), with margin.
* ``U = min over blocks of (min v~ + e)`` bounds the nearest item's ``v`` from above, so only
  items with ``v~ <= U + e`` can be nearest. Those few candidates (about 4 per query on real
  PatchCore features) are scored exactly in float32 and the smallest wins (lowest index on ties).
* The candidates' observed errors are checked against the bound; a violation (a BLAS that does
  not accumulate in float32) switches the search to plain float32 with a warning.

Results equal :func:`adlib.models.components.nearest.nearest_neighbors` with ``k=1`` up to the
float32 rounding of the distance itself.
"""
from __future__ import annotations

import warnings

import torch

from adlib.models.components.nearest import nearest_neighbors

#: unit roundoff of bfloat16 (8 significant bits, round to nearest)
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def bf16_prefilter_available(device: torch.device | str) -> bool:
    """True on CPUs where oneDNN runs bfloat16 matrix products natively."""
    if torch.device(device).type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _pad_columns(matrix: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero columns up to a multiple of ``multiple`` (oneDNN's bf16 kernels run ~1.7x faster)."""
    return torch.nn.functional.pad(matrix, (0, -matrix.shape[1] % multiple))


class BankSearch:
    """Exact 1-nearest-neighbour search over a fixed bank ``[N, D]``.

    ``prefilter``: ``None`` uses the bfloat16 prefilter where :func:`bf16_prefilter_available`,
    ``False`` searches in plain float32 blocks, ``True`` forces the prefilter. ``chunk_elements``
    bounds the bfloat16 values held at once: queries per chunk = ``chunk_elements // N``, but
    at least ``min_chunk_rows`` (narrower products run slower).

    Measured on Lite0 patch features, 32,768 queries, 2 cores (peak above the bank, seconds):
    a 25,600-item bank 328 MiB / 0.64 s at ``2^26`` elements, 156 MiB / 0.66 s at ``2^24``; a
    200,000-item bank 216 MiB / 4.39 s at ``2^26`` (335 rows), 5.84 s at ``2^24`` (83 rows),
    4.61 s at 167 rows.
    """

    #: coefficients of the error bound ``(A |q| c_max + B c_max^2) u`` (module docstring)
    error_coefficients = (6.5, 2.5)
    #: share of the bank (at least 64 items) a chunk's queries may keep as candidates on average;
    #: above it gathering and recomputing them costs more than a plain float32 search, which then
    #: decides the chunk. Items the bfloat16 bound cannot tell apart (near-equidistant ones, e.g.
    #: random-init features) all stay candidates; real PatchCore features leave about 4 of 77,004.
    max_candidate_share = 1 / 64

    def __init__(self, bank: torch.Tensor, *, prefilter: bool | None = None, bank_block: int = 4096,
                 chunk_elements: int = 1 << 24, min_chunk_rows: int = 192) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"BankSearch needs a non-empty [N, D] bank, got shape {tuple(bank.shape)}")
        self.bank = bank.float()
        self.centre = self.bank.mean(dim=0)
        self.chunk_elements = int(chunk_elements)
        self.min_chunk_rows = int(min_chunk_rows)
        self.plain_chunks = 0  # prefilter chunks decided by the plain search (too many candidates)
        self.prefilter = bf16_prefilter_available(bank.device) if prefilter is None else bool(prefilter)
        self._centred: torch.Tensor | None = None  # float32 search only (the prefilter keeps `sorted`)
        self.sorted: torch.Tensor | None = None  # centred rows in norm order (prefilter only)
        if self.prefilter:
            self._prepare_blocks(int(bank_block))

    def _prepare_blocks(self, bank_block: int) -> None:
        centred = self.bank - self.centre
        norms = torch.linalg.vector_norm(centred, dim=1)
        self.order = torch.argsort(norms, stable=True)  # sorted position -> bank index
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(len(self.order), device=self.order.device)
        self.sorted = centred[self.order].contiguous()
        del centred
        self.sorted_sq = norms[self.order].pow(2)
        augmented = _pad_columns(torch.cat([-2.0 * self.sorted, self.sorted_sq.unsqueeze(1)], dim=1))
        starts = list(range(0, self.sorted.shape[0], bank_block))
        self.block_starts = starts
        self.blocks = [augmented[s:s + bank_block].to(torch.bfloat16).contiguous() for s in starts]
        self.block_max_norm = torch.stack([norms[self.order[min(s + bank_block, len(norms)) - 1]] for s in starts])

    def centred_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows ``index`` minus the bank mean."""
        if self.sorted is not None:
            return self.sorted[self.position[index]]
        return self.centred_bank()[index]

    def centred_bank(self) -> torch.Tensor:
        """The whole bank minus its mean (kept once built)."""
        if self._centred is None:
            self._centred = self.bank - self.centre
        return self._centred

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distance [Q], index [Q])`` of each query's nearest bank row (Euclidean)."""
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries {tuple(queries.shape)} must be [Q, {self.bank.shape[1]}]")
        with torch.autocast(device_type=queries.device.type, enabled=False):
            q = queries.float() - self.centre
            if not self.prefilter or q.shape[0] == 0:
                index = self._plain(q)
            else:
                rows = max(1, self.min_chunk_rows, self.chunk_elements // self.bank.shape[0])
                index = torch.cat([self._search_chunk(q[r:r + rows]) for r in range(0, q.shape[0], rows)])
            # the winner's distance directly (no |q|^2 + |c|^2 - 2 q.c cancellation)
            return torch.linalg.vector_norm(q - self.centred_rows(index), dim=1), index

    def _plain(self, q: torch.Tensor) -> torch.Tensor:
        """Nearest bank index of each centred query by plain float32 blocks."""
        return nearest_neighbors(q, self.centred_bank(), k=1)[1].squeeze(1)

    def _search_chunk(self, q: torch.Tensor) -> torch.Tensor:
        """Nearest bank index of each centred query through the bfloat16 prefilter."""
        if not self.prefilter:  # an earlier chunk saw the error bound fail
            return self._plain(q)
        q_sq = q.pow(2).sum(1)
        q_aug = _pad_columns(torch.cat([q, torch.ones_like(q[:, :1])], dim=1)).to(torch.bfloat16)
        approx = [q_aug @ block.t() for block in self.blocks]  # bf16 [Q, n_j] each
        minima = torch.stack([a.amin(dim=1).float() for a in approx], dim=1)  # [Q, blocks]
        a, b = self.error_coefficients
        c_max = self.block_max_norm
        errors = (a * q_sq.sqrt().unsqueeze(1) * c_max + b * c_max ** 2) * BF16_UNIT_ROUNDOFF
        limit = (minima + errors).amin(dim=1, keepdim=True) + errors  # v~ above: not nearest
        per_query = max(64, int(self.max_candidate_share * self.bank.shape[0]))
        found = self._candidates(approx, minima, limit, errors, per_query * q.shape[0])
        if found is None:
            self.plain_chunks += 1
            return self._plain(q)
        rows, cols, values, slack = found
        exact = self._exact_values(q, rows, cols)
        if bool(((exact - values).abs() > slack * 1.0001 + 1e-6).any()):
            warnings.warn("BankSearch: the bfloat16 product exceeded its error bound on this machine; "
                          "searching in float32 instead (exact, slower)", RuntimeWarning, stacklevel=4)
            self.prefilter = False
            return self._plain(q)
        n = q.shape[0]
        best_v = torch.full((n,), float("inf"), device=q.device).scatter_reduce(0, rows, exact, "amin")
        at_best = exact == best_v[rows]
        index = torch.full((n,), self.bank.shape[0], dtype=torch.long, device=q.device).scatter_reduce(
            0, rows[at_best], self.order[cols[at_best]], "amin")  # lowest bank index among ties
        lost = index == self.bank.shape[0]  # non-finite queries match nothing: plain search decides
        if bool(lost.any()):
            index[lost] = self._plain(q[lost])
        return index

    def _exact_values(self, q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``|c|^2 - 2 q.c`` of each (query row, sorted position) pair, gathered in pieces of
        about ``chunk_elements / 4`` values."""
        step = max(1, self.chunk_elements // (4 * q.shape[1]))
        return torch.cat([self.sorted_sq[c] - 2.0 * (self.sorted[c] * q[r]).sum(1)
                          for r, c in zip(rows.split(step), cols.split(step))])

    def _candidates(self, approx: list[torch.Tensor], minima: torch.Tensor, limit: torch.Tensor,
                    errors: torch.Tensor, max_count: int) -> tuple[torch.Tensor, ...] | None:
        """``(query row, sorted position, v~, error bound)`` of every item with ``v~ <= limit``;
        ``None`` as soon as there are more than ``max_count``."""
        rows, cols, values, slack, count = [], [], [], [], 0
        for j, start in enumerate(self.block_starts):
            # rows in pieces: the comparison with float32 limits works on a float32 copy of its rows
            step = max(1, self.chunk_elements // (4 * approx[j].shape[1]))
            for piece in (minima[:, j] <= limit[:, j]).nonzero().flatten().split(step):
                sub = approx[j].index_select(0, piece)
                hits = sub <= limit[piece, j].unsqueeze(1)
                count += int(torch.count_nonzero(hits))  # (a bool sum would make an int64 copy)
                if count > max_count:
                    return None
                r, c = hits.nonzero(as_tuple=True)
                rows.append(piece[r])
                cols.append(c + start)
                values.append(sub[r, c].float())
                slack.append(errors[piece[r], j])
        if not rows:
            return tuple(torch.empty(0, dtype=dtype, device=minima.device)
                         for dtype in (torch.long, torch.long, torch.float32, torch.float32))
        return torch.cat(rows), torch.cat(cols), torch.cat(values), torch.cat(slack)
