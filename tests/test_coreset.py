"""Greedy k-center coreset, random projection, blocked nearest neighbours and the patch store."""
from __future__ import annotations

import math

import pytest
import torch

from adlib.models.components.coreset import gaussian_projection, greedy_coreset, start_index
from adlib.models.components.nearest import nearest_neighbors
from adlib.models.components.patch_store import PatchStore


def reference_greedy(points: torch.Tensor, num_select: int, seed: int) -> list[int]:
    """The plain greedy k-center loop, in float64, one full distance pass per centre."""
    x = points.double()
    selected = [start_index(len(x), seed)]
    min_d = torch.full((len(x),), math.inf, dtype=torch.float64)
    while True:
        min_d = torch.minimum(min_d, ((x - x[selected[-1]]) ** 2).sum(1))
        min_d[selected] = -math.inf
        if len(selected) == num_select:
            return selected
        selected.append(int(torch.argmax(min_d)))


@pytest.mark.parametrize("case", range(8))
def test_greedy_coreset_matches_plain_greedy_loop(case):
    gen = torch.Generator().manual_seed(case)
    n = int(torch.randint(40, 1500, (1,), generator=gen))
    d = int(torch.randint(2, 48, (1,), generator=gen))
    points = torch.randn(n, d, generator=gen) * 3 + 5  # offset: distances must not depend on the origin
    ratio = (0.02, 0.1, 0.5, 1.0)[case % 4]
    num_select = max(1, int(n * ratio))
    pool_size = (8, 32, 1024)[case % 3]  # small pools force many rounds
    got = greedy_coreset(points, num_select, seed=case, pool_size=pool_size).tolist()
    assert got == reference_greedy(points, num_select, seed=case)


@pytest.mark.parametrize("pool_size, block_elements", [(1, 1 << 20), (64, 256), (700, 5000)])
def test_greedy_coreset_with_tiny_pools_and_blocks_matches_plain_loop(pool_size, block_elements):
    # small blocks: many staleness groups and centre blocks per refresh; pool 1: one pick per round
    gen = torch.Generator().manual_seed(pool_size)
    points = torch.randn(2500, 12, generator=gen) + 3
    got = greedy_coreset(points, 300, seed=1, pool_size=pool_size, block_elements=block_elements).tolist()
    assert got == reference_greedy(points, 300, seed=1)


def test_greedy_coreset_with_duplicate_points_selects_the_same_vectors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 8, generator=gen)
    points = torch.cat([base, base[:100], base[:50]])  # exact ties: which copy is taken is arbitrary
    got = greedy_coreset(points, 250, seed=3, pool_size=16)
    want = torch.tensor(reference_greedy(points, 250, seed=3))
    assert len(set(got.tolist())) == 250  # never the same index twice
    assert torch.equal(points[got], points[want])


def test_greedy_coreset_validates_arguments():
    points = torch.randn(10, 3)
    with pytest.raises(ValueError, match="cannot select"):
        greedy_coreset(points, 11)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        greedy_coreset(torch.randn(10), 2)
    assert sorted(greedy_coreset(points, 10).tolist()) == list(range(10))


def test_gaussian_projection_is_seeded_and_roughly_preserves_distances():
    p1, p2 = gaussian_projection(512, 128, seed=1), gaussian_projection(512, 128, seed=1)
    assert torch.equal(p1, p2) and not torch.equal(p1, gaussian_projection(512, 128, seed=2))
    x = torch.randn(50, 512, generator=torch.Generator().manual_seed(0))
    ratio = torch.pdist(x @ p1) / torch.pdist(x)
    assert 0.8 < ratio.mean() < 1.2 and ratio.min() > 0.5


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_blocked_equals_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(257, 16, generator=gen), torch.randn(45, 16, generator=gen)
    dist, index = nearest_neighbors(queries, bank, k=k, block_elements=500)  # many small blocks
    full = torch.cdist(queries.double(), bank.double())
    want_d, want_i = full.topk(k, dim=1, largest=False)
    assert torch.equal(index, want_i)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-4, atol=1e-4)


def test_nearest_neighbors_rejects_empty_bank_and_bad_shapes():
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbors(torch.randn(2, 4), torch.empty(0, 4))
    with pytest.raises(ValueError, match="same feature dimension"):
        nearest_neighbors(torch.randn(2, 4), torch.randn(3, 5))


@pytest.mark.parametrize("expected_rows", [None, 40, 10])  # no hint, the right one, too few
def test_patch_store_unbounded_keeps_every_row_and_gathers_across_batches(expected_rows):
    store = PatchStore(torch.float16, expected_rows=expected_rows)
    rows = torch.arange(40, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    store.add(rows[:7], rows[:7, :2] * 10)
    first_buffer = store.projected().data_ptr()
    for start in range(7, 40, 7):
        store.add(rows[start:start + 7], rows[start:start + 7, :2] * 10)
    assert len(store) == 40
    # sized from the hint, the projections are written once where the coreset search reads them
    assert (store.projected().data_ptr() == first_buffer) == (expected_rows == 40)
    assert torch.equal(store.projected(), rows[:, :2] * 10)
    picked = torch.tensor([39, 0, 8, 7, 21])
    assert torch.equal(store.gather(picked), rows[picked])  # float16 holds small integers exactly


def test_patch_store_reservoir_is_bounded_uniform_and_keeps_rows_aligned():
    capacity, total = 500, 5000
    store = PatchStore(torch.float32, capacity=capacity, seed=0)
    ids = torch.arange(total, dtype=torch.float32).unsqueeze(1)
    for start in range(0, total, 333):
        store.add(ids[start:start + 333], ids[start:start + 333] + 0.5)
    kept = store.projected()[:, 0] - 0.5
    assert len(store) == capacity and store.seen == total
    assert kept.unique().numel() == capacity  # no row twice
    assert torch.equal(store.gather(torch.arange(capacity))[:, 0], kept)  # features match projections
    # uniform over the stream: mean position near the middle, both halves represented
    assert abs(kept.mean().item() - total / 2) < total * 0.06
    assert 0.4 < (kept < total / 2).float().mean().item() < 0.6
    again = PatchStore(torch.float32, capacity=capacity, seed=0)
    for start in range(0, total, 333):
        again.add(ids[start:start + 333], ids[start:start + 333] + 0.5)
    assert torch.equal(again.projected(), store.projected())  # seeded


def test_nearest_neighbors_stay_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 32, generator=gen) * 50, torch.randn(20, 32, generator=gen) * 50
    want = nearest_neighbors(queries, bank, k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_neighbors(queries, bank, k=2)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
