"""Prediction latency of registered models: median ms per image at batch 1 (after warm-up) and
ms per image at a larger batch, with the machine's load printed beside each number.

The CPU of a shared machine is noisy: every timing is the median of ``--repeats`` runs, the
minimum is shown too (other load only ever slows a run down), and the 1-minute load average
before and after is printed so a reader can judge the numbers.

    python benchmarks/bench_latency.py --models efficientad-small efficientad-medium
    python benchmarks/bench_latency.py --models efficientad-small --set predict_dtype=float32
    python benchmarks/bench_latency.py --models efficientad-small --backbone-dir backbones   # real teacher

Without ``--backbone-dir`` the frozen networks are random-init (latency does not depend on the
weights' values).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} CPUs"


def time_predict(model, images, repeats: int, warmup: int = 3) -> list[float]:
    """Seconds of ``model.predict(images)``, ``repeats`` times after ``warmup`` calls."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            model.predict(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict(images)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientad-small", "efficientad-medium"])
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="the larger batch (default 32)")
    parser.add_argument("--repeats", type=int, default=15, help="timed batch-1 runs (default 15)")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed large-batch runs (default 3)")
    parser.add_argument("--backbone-dir", default=None, help="load pretrained frozen weights from here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option override")
    args = parser.parse_args()

    import torch
    import yaml

    from adlib.models.registry import create_model

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {_load()}")
    for name in args.models:
        model = create_model(name, pretrained=args.backbone_dir is not None, backbone_dir=args.backbone_dir,
                             **overrides).eval()
        side = args.img_size
        one = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        before = _load()
        b1 = time_predict(model, one, args.repeats)
        batch = torch.rand(args.batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        bn = time_predict(model, batch, args.batch_repeats, warmup=1)
        dtype = getattr(model, "predict_dtype", "-")
        print(f"{name} ({side} px, predict_dtype {dtype}): batch 1 median {1000 * statistics.median(b1):.1f} ms "
              f"(min {1000 * min(b1):.1f}, {len(b1)} runs); batch {args.batch} "
              f"{1000 * statistics.median(bn) / args.batch:.1f} ms/img (min {1000 * min(bn) / args.batch:.1f}); "
              f"{before} -> {_load()}")


if __name__ == "__main__":
    main()
