"""Time, memory and accuracy of the streamed pixel metrics (adlib.evaluation.PixelMetrics).

Synthetic test set: N anomaly maps of SIZE x SIZE (gamma noise; every other image gets 1-3
rectangular defects whose pixels score higher). Maps are generated batch by batch, so only one
batch is ever in memory, as in a real evaluation loop.

Prints: update+compute seconds and per-image ms, peak extra memory of one update (tracemalloc,
numpy allocations), accumulator state size, process peak RSS; then, on a subset, the binned
pixel AUROC / AUPRO against the exact values (scikit-learn roc_auc_score, adlib aupro_exact)
for several bin counts and grid set-ups (first batch's range, the known range, a grid
that starts far too narrow and has to grow), and how long the exact computations take.

    .venv/bin/python benchmarks/bench_pixel_metrics.py [--images 500] [--size 256] [--subset 50]
"""
from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np
from sklearn.metrics import roc_auc_score

from adlib.evaluation import PixelMetrics, aupro_exact


def synthetic_batch(start: int, count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    maps = np.empty((count, size, size), dtype=np.float32)
    masks = np.zeros((count, size, size), dtype=bool)
    for j in range(count):
        rng = np.random.default_rng((seed, start + j))
        maps[j] = rng.gamma(2.0, 1.0, (size, size))
        if (start + j) % 2 == 0:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, size - size // 6, 2)
                h, w = rng.integers(size // 64 + 1, size // 6, 2)
                masks[j, r:r + h, c:c + w] = True
            maps[j][masks[j]] += 2.0 * rng.random(int(masks[j].sum()), dtype=np.float32)
    return maps, masks


def run_stream(n: int, size: int, batch: int, bins: int, seed: int, score_range=None) -> dict:
    pm = PixelMetrics(num_bins=bins, score_range=score_range)
    seconds, peak_extra = 0.0, 0
    tracemalloc.start()
    for start in range(0, n, batch):
        maps, masks = synthetic_batch(start, min(batch, n - start), size, seed)
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        pm.update(maps, masks)
        seconds += time.perf_counter() - t0
        peak_extra = max(peak_extra, tracemalloc.get_traced_memory()[1] - baseline)
        del maps, masks
    tracemalloc.stop()
    t0 = time.perf_counter()
    result = pm.compute()
    seconds += time.perf_counter() - t0
    return {"seconds": seconds, "peak_extra_mb": peak_extra / 2**20, "state_kb": pm.nbytes / 1024,
            "regions": pm.n_regions, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bins", type=int, default=4096)
    parser.add_argument("--subset", type=int, default=50, help="images compared against the exact metrics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, size = args.images, args.size
    pixels = n * size * size

    print(f"== streamed PixelMetrics: {n} maps of {size}x{size} ({pixels / 1e6:.1f} M pixels), "
          f"batch {args.batch}, {args.bins} bins")
    t0 = time.perf_counter()
    for start in range(0, n, args.batch):
        synthetic_batch(start, min(args.batch, n - start), size, args.seed)
    print(f"(generating the synthetic maps alone: {time.perf_counter() - t0:.2f} s, not counted below)")
    res = run_stream(n, size, args.batch, args.bins, args.seed)
    print(f"update+compute: {res['seconds']:.2f} s  ({1000 * res['seconds'] / n:.2f} ms/image, "
          f"{pixels / res['seconds'] / 1e6:.0f} M pixels/s)")
    print(f"peak extra memory per update: {res['peak_extra_mb']:.1f} MiB (batch of {args.batch}: "
          f"{args.batch * size * size * 4 / 2**20:.1f} MiB of float32 maps); accumulator state: "
          f"{res['state_kb']:.0f} KiB; {res['regions']} defect regions")
    print(f"pixel AUROC {res['pixel_auroc']:.6f}, AUPRO {res['pixel_aupro']:.6f}")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    m = args.subset
    print(f"\n== accuracy on the first {m} images ({m * size * size / 1e6:.1f} M pixels) vs exact")
    maps, masks = synthetic_batch(0, m, size, args.seed)
    t0 = time.perf_counter()
    exact_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    t_auroc = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact_aupro = aupro_exact(maps, masks)
    t_aupro = time.perf_counter() - t0
    print(f"exact: AUROC {exact_auroc:.6f} (sklearn, {t_auroc:.2f} s), AUPRO {exact_aupro:.6f} "
          f"(aupro_exact, {t_aupro:.2f} s)")
    print(f"{'bins':>6} {'grid':>13} {'seconds':>8} {'|dAUROC|':>10} {'|dAUPRO|':>10}")
    for bins in (256, 1024, 4096, 16384):
        grids = (("from batch 1", None), ("known range", (float(maps.min()), float(maps.max()))),
                 ("grown", (1.0, 1.1)))  # starts narrow, doubles until it covers the scores
        for label, score_range in grids:
            r = run_stream(m, size, args.batch, bins, args.seed, score_range)
            print(f"{bins:>6} {label:>13} {r['seconds']:>8.2f} {abs(r['pixel_auroc'] - exact_auroc):>10.2e} "
                  f"{abs(r['pixel_aupro'] - exact_aupro):>10.2e}")


if __name__ == "__main__":
    main()
