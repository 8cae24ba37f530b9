"""Exact nearest-item search with the bfloat16 prefilter (adlib.models.components.bank_search)."""
from __future__ import annotations

import warnings

import pytest
import torch

from adlib.models.components.bank_search import BankSearch, bf16_prefilter_available


#: clusters of the synthetic banks: items in one cluster are near-equidistant from its queries, so
#: each cluster stays below the share of the bank at which the prefilter gives way to float32
CLUSTERS = 200


def clustered(n_bank: int, n_query: int, dim: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank and queries around shared cluster centres, far from the origin (PatchCore-like)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLUSTERS, dim, generator=gen) * scale
    offset = 5 * scale
    bank = centres[torch.randint(CLUSTERS, (n_bank,), generator=gen)] + torch.randn(n_bank, dim, generator=gen) * scale * 0.1
    queries = centres[torch.randint(CLUSTERS, (n_query,), generator=gen)] + torch.randn(n_query, dim, generator=gen) * scale * 0.12
    return bank + offset, queries + offset


def float64_nearest(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cdist(queries.double(), bank.double()).min(dim=1)


@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize("n_bank, n_query, dim, scale, bank_block", [
    (1000, 500, 7, 1.0, 64),       # many blocks, tiny dimension
    (3000, 1500, 152, 10.0, 512),  # PatchCore-like width
    (2000, 800, 64, 0.01, 100),    # small magnitudes
    (300, 50, 33, 1e3, 4096),      # large magnitudes, one block
    (1, 10, 5, 1.0, 4096),         # one memory item
])
def test_bank_search_equals_float64_brute_force(prefilter, n_bank, n_query, dim, scale, bank_block):
    bank, queries = clustered(n_bank, n_query, dim, scale, seed=dim)
    search = BankSearch(bank, prefilter=prefilter, bank_block=bank_block, chunk_elements=50_000,
                        min_chunk_rows=1)  # many chunks
    dist, index = search.search(queries)
    want_dist, want_index = float64_nearest(queries, bank)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(dist.double(), want_dist, rtol=1e-6, atol=1e-6 * scale)
    assert search.prefilter is prefilter  # the error bound held throughout


def test_bank_search_breaks_ties_towards_the_lowest_index():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=gen).repeat(3, 1)  # every item three times
    queries = torch.randn(100, 8, generator=gen)
    for prefilter in (True, False):
        _, index = BankSearch(bank, prefilter=prefilter).search(queries)
        assert bool((index < 50).all())


def test_bank_search_falls_back_to_float32_when_the_error_bound_fails():
    bank, queries = clustered(500, 300, 16, 1.0, seed=1)
    search = BankSearch(bank, prefilter=True)
    search.error_coefficients = (1e-9, 1e-9)  # a bound far too tight for bfloat16 rounding
    with pytest.warns(RuntimeWarning, match="exceeded its error bound"):
        dist, index = search.search(queries)
    assert search.prefilter is False
    assert torch.equal(index, float64_nearest(queries, bank)[1])


def test_bank_search_handles_empty_and_non_finite_queries_and_rejects_bad_shapes():
    bank, queries = clustered(200, 20, 6, 1.0, seed=2)
    search = BankSearch(bank, prefilter=True)
    dist, index = search.search(queries[:0])
    assert dist.shape == (0,) and index.shape == (0,)
    queries[3, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NaN query is not an error-bound failure
        dist, index = search.search(queries)
    assert torch.isnan(dist[3]) and 0 <= int(index[3]) < 200
    assert search.prefilter
    dist, index = search.search(torch.full((4, 6), float("nan")))  # a chunk with no candidate at all
    assert torch.isnan(dist).all() and ((0 <= index) & (index < 200)).all()
    with pytest.raises(ValueError, match=r"must be \[Q, 6\]"):
        search.search(torch.randn(4, 5))
    with pytest.raises(ValueError, match="non-empty"):
        BankSearch(torch.empty(0, 6))


def test_bank_search_is_float32_under_autocast():
    bank, queries = clustered(400, 100, 12, 1.0, seed=3)
    search = BankSearch(bank, prefilter=True)
    want = search.search(queries)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = search.search(queries)
    assert got[0].dtype == torch.float32 and torch.equal(got[1], want[1])


def test_prefilter_is_only_offered_on_cpus():
    assert bf16_prefilter_available("meta") is False
    assert isinstance(bf16_prefilter_available("cpu"), bool)


def test_items_the_prefilter_cannot_separate_are_searched_in_float32_without_gathering_them_all():
    # every item at the same distance from the queries' region: the bfloat16 bound keeps them all
    # as candidates (as random-init features do); gathering 2,048 x 4,096 candidate rows of 1,536
    # floats would need 51 GB
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(4096, 1536, generator=gen), dim=1) * 100.0
    queries = torch.randn(2048, 1536, generator=gen) * 1e-3
    search = BankSearch(bank, prefilter=True)
    dist, index = search.search(queries)
    assert search.plain_chunks > 0 and search.prefilter is True  # decided in float32, bound intact
    want_dist, _ = float64_nearest(queries, bank)
    torch.testing.assert_close(dist.double(), want_dist, rtol=1e-6, atol=1e-4)  # near-ties: either item


def test_real_like_features_stay_on_the_prefilter():
    bank, queries = clustered(3000, 500, 64, 1.0, seed=3)
    search = BankSearch(bank, prefilter=True, chunk_elements=200_000, min_chunk_rows=1)
    search.search(queries)
    assert search.plain_chunks == 0
