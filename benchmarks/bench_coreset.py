"""Time PatchCore's coreset selection at the size of a real fit.

Default: 210 training images at 256 px with wide_resnet50_2 layer2+layer3 features
(32 x 32 = 1,024 patches per image, 1,536 dims) -> 215,040 patches, projected to 128 dims,
10% coreset. Features are random (the selection cost does not depend on what they show).
Runs the same path as PatchCore.collect/finalize: per-batch projection into a float16
PatchStore, greedy selection on the projections, gathering the selected full features.

    .venv/bin/python benchmarks/bench_coreset.py [--images 210] [--threads 2]

Prints seconds per phase, an extrapolated time for the plain one-pass-per-centre greedy loop,
and the peak RSS of the process.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

from adlib.models.components.coreset import gaussian_projection, greedy_coreset
from adlib.models.components.nearest import squared_distances
from adlib.models.components.patch_store import PatchStore


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_loop_seconds_per_centre(points: torch.Tensor, iterations: int) -> float:
    """Seconds per centre of the plain greedy loop (one full distance pass per centre)."""
    x = points - points.mean(0)
    sq = x.pow(2).sum(1)
    min_d = torch.full((x.shape[0],), math.inf)
    centre = 0
    start = time.perf_counter()
    for _ in range(iterations):
        d = squared_distances(x, x[centre:centre + 1], a_sq=sq, b_sq=sq[centre:centre + 1]).squeeze(1)
        torch.minimum(min_d, d, out=min_d)
        min_d[centre] = -math.inf
        centre = int(torch.argmax(min_d))
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=210)
    parser.add_argument("--patches-per-image", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32, help="images per collect() call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain-iterations", type=int, default=100,
                        help="centres timed for the plain-loop estimate (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    projection = gaussian_projection(args.dim, args.projection_dim, seed=0)
    store = PatchStore(torch.float16)

    start = time.perf_counter()
    for first in range(0, args.images, args.batch):
        rows = min(args.batch, args.images - first) * args.patches_per_image
        features = torch.rand(rows, args.dim, generator=gen)  # non-negative, like post-ReLU features
        store.add(features, features @ projection)
    collect_s = time.perf_counter() - start

    points = store.projected()
    n_select = max(1, int(len(store) * args.ratio))
    start, cpu_start = time.perf_counter(), cpu_seconds()
    index = greedy_coreset(points, n_select, seed=0)
    select_s, select_cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start

    start = time.perf_counter()
    bank = store.gather(index)
    gather_s = time.perf_counter() - start

    plain = plain_loop_seconds_per_centre(points, args.plain_iterations) if args.plain_iterations else None
    result = {
        "patches": len(store), "dim": args.dim, "projection_dim": args.projection_dim, "selected": n_select,
        "threads": args.threads, "collect_s": round(collect_s, 2), "coreset_s": round(select_s, 2),
        "coreset_cpu_s": round(select_cpu_s, 2),
        "gather_s": round(gather_s, 2), "memory_bank_shape": list(bank.shape),
        "plain_loop_estimate_s": round(plain * n_select, 1) if plain else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(f"{result['patches']:,} patches x {args.dim} dims -> {args.projection_dim}-d projection, "
          f"{n_select:,} centres ({args.ratio:.0%}), {args.threads} threads")
    print(f"  collect (project + float16 store): {collect_s:8.2f} s")
    print(f"  greedy coreset selection:          {select_s:8.2f} s  (CPU time {select_cpu_s:.1f} s; "
          f"wall time grows when other processes share the cores)")
    print(f"  gather selected features:          {gather_s:8.2f} s")
    if plain:
        print(f"  plain greedy loop (estimated):     {plain * n_select:8.1f} s")
    print(f"  peak RSS:                          {result['peak_rss_mb']:8.1f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
