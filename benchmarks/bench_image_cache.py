"""Decode+resize throughput, cold (from the image files) vs from the image cache.

Uses the magnetic tile set at ../shared/data when present, else a synthetic MVTec-layout set.
Both passes read every image of the manifest through ImageDataset in one process, so the
numbers are per-core images/s (best of ``--repeats`` passes). The target is cache/cold >= 10.

    .venv/bin/python benchmarks/bench_image_cache.py [--img-size 256] [--data-root PATH]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from adlib.data import ImageCache, ImageDataset, index_dataset
from adlib.data.synthetic import make_dataset

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def images_per_second(dataset: ImageDataset, repeats: int) -> float:
    """Best of ``repeats`` passes over every item (the CPUs may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if (args.data_root / "magnetic_tile").is_dir():
            source = f"magnetic tile ({args.data_root / 'magnetic_tile'})"
            manifest = index_dataset("mvtec", args.data_root, "magnetic_tile")
        else:
            source = "synthetic (magnetic tile not found)"
            root = make_dataset("mvtec", Path(tmp) / "data", n_train=300, n_test_good=50, n_test_bad=50, size=320)
            manifest = index_dataset("mvtec", root, "widget")
        print(f"data: {source}, {len(manifest)} images, img_size {args.img_size}")
        cold = images_per_second(ImageDataset(manifest, args.img_size), args.repeats)
        start = time.perf_counter()
        cache = ImageCache.build(manifest, Path(tmp) / "cache", args.img_size)
        build_s = time.perf_counter() - start
        cached = images_per_second(ImageDataset(manifest, args.img_size, cache=cache), args.repeats)
        print(f"cold (decode + resize):  {cold:10.1f} images/s")
        print(f"cache build (threads):   {build_s:10.2f} s ({len(manifest) / build_s:.1f} images/s)")
        print(f"from cache (memmap):     {cached:10.1f} images/s")
        print(f"ratio cache/cold:        {cached / cold:10.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
