"""Time PatchCore's two arithmetic-heavy steps on real features: coreset selection and the exact
nearest-memory-item search, with the bfloat16 prefilter and in plain float32.

Default: ../shared/data/magnetic_tile, pip EfficientNet-Lite0 at 256 px (the issue-3 setting):
752 training images -> 770,048 patches x 152 dims, 10% coreset; the test images' patches are
searched against it.

    .venv/bin/python benchmarks/bench_patchcore_search.py [--test-images 592] [--plain-images 100]

Prints seconds per phase, the prefilter's speed-up over float32 on the same queries, whether
both searches returned the same items (they must: the prefilter is exact), and this machine's
peak matrix-product rates with the time the two steps' arithmetic needs at those rates.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from runner import add_data_options



def load_images(manifest: Path, cache: Path, split: str, img_size: int) -> torch.Tensor:
    from adlib.data import ImageCache, ImageDataset, load_manifest

    frame = load_manifest(manifest)
    frame = frame[frame["split"] == split].reset_index(drop=True)
    dataset = ImageDataset(frame, img_size, normalize=False, cache=ImageCache.build(frame, cache, img_size))
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def gemm_rate(dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    """Best GFLOP/s of a square matrix product in ``dtype`` (the machine's practical peak)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(parser)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--test-images", type=int, default=592, help="test images searched with the prefilter")
    parser.add_argument("--plain-images", type=int, default=100, help="of those, searched in float32 too")
    args = parser.parse_args()

    from adlib.allocator import reuse_freed_memory
    from adlib.models.components.bank_search import BankSearch, bf16_prefilter_available
    from adlib.models.registry import create_model
    from adlib.run import prepare_data

    reuse_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="adlib-bench-search-"))
    manifest = prepare_data({"name": "bench", "layout": "mvtec", "root": args.data_root}, args.category,
                            args.img_size, work / "manifest.parquet", work / "cache")
    model = create_model("patchcore", backbone=args.backbone).eval()
    with torch.no_grad():
        start = time.perf_counter()
        train = load_images(manifest, work / "cache", "train", args.img_size)
        for i in range(0, len(train), args.batch):
            model.collect(train[i:i + args.batch])
        collect_s = time.perf_counter() - start
        patches = len(model._store)
        start = time.perf_counter()
        model.finalize()
        coreset_s = time.perf_counter() - start
        test = load_images(manifest, work / "cache", "test", args.img_size)[:args.test_images]
        queries = torch.cat([model.embed(test[i:i + args.batch]).flatten(2).transpose(1, 2).flatten(0, 1)
                             for i in range(0, len(test), args.batch)])
    bank = model.memory_bank
    fast = BankSearch(bank, prefilter=True)
    start = time.perf_counter()
    dist, index = fast.search(queries)
    fast_s = time.perf_counter() - start
    n_plain = min(args.plain_images, len(test)) * (queries.shape[0] // max(1, len(test)))
    start = time.perf_counter()
    plain_dist, plain_index = BankSearch(bank, prefilter=False).search(queries[:n_plain])
    plain_s = time.perf_counter() - start
    per_query_fast, per_query_plain = fast_s / queries.shape[0], plain_s / max(1, n_plain)
    fp32_rate, bf16_rate = gemm_rate(torch.float32), gemm_rate(torch.bfloat16)
    search_flop = 2.0 * queries.shape[0] * bank.shape[0] * bank.shape[1]
    coreset_flop = 2.0 * patches * bank.shape[0] * 128  # one full update per centre, 128-d projection
    result = {
        "train_patches": patches, "memory_bank": list(bank.shape), "queries": queries.shape[0],
        "collect_s": round(collect_s, 1), "coreset_s": round(coreset_s, 1),
        "search_prefilter_s": round(fast_s, 1), "search_float32_s_extrapolated": round(per_query_plain * queries.shape[0], 1),
        "speedup": round(per_query_plain / per_query_fast, 2),
        "same_items": bool(torch.equal(index[:n_plain], plain_index)),
        "max_distance_difference": float((dist[:n_plain] - plain_dist).abs().max()) if n_plain else 0.0,
        "prefilter_native_here": bf16_prefilter_available("cpu"), "threads": torch.get_num_threads(),
        "gemm_gflops_fp32": round(fp32_rate), "gemm_gflops_bf16": round(bf16_rate),
        "search_tflop": round(search_flop / 1e12, 1), "coreset_full_update_tflop": round(coreset_flop / 1e12, 1),
        "search_s_at_bf16_peak": round(search_flop / bf16_rate / 1e9, 1),
        "coreset_full_update_s_at_fp32_peak": round(coreset_flop / fp32_rate / 1e9, 1),
    }
    print(f"{patches:,} train patches -> memory bank {bank.shape[0]:,} x {bank.shape[1]}; "
          f"{queries.shape[0]:,} test patches")
    print(f"  collect (backbone + features):  {collect_s:7.1f} s")
    print(f"  coreset selection (10%):        {coreset_s:7.1f} s")
    print(f"  nearest item, bf16 prefilter:   {fast_s:7.1f} s")
    print(f"  nearest item, float32:          {per_query_plain * queries.shape[0]:7.1f} s "
          f"(timed on {n_plain:,} queries)  -> speed-up {result['speedup']}x, same items: {result['same_items']}")
    print(f"  peak matrix products here: float32 {fp32_rate:.0f} GFLOP/s, bfloat16 {bf16_rate:.0f} GFLOP/s")
    print(f"  search arithmetic {search_flop / 1e12:.1f} TFLOP -> {result['search_s_at_bf16_peak']} s at the bfloat16 "
          f"peak; coreset with full updates {coreset_flop / 1e12:.1f} TFLOP -> "
          f"{result['coreset_full_update_s_at_fp32_peak']} s at the float32 peak")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
