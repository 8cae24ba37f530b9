"""Tiled vs untiled runs of the same models: pixel AUPRO, fit time, time per full image, peak RSS.

Default data: a large synthetic set (``adlib.data.synthetic.make_surface_dataset``: 384 x 512
woven-surface images with 4 px spots, which resizing to 256 px shrinks to about 2 px), generated
in a temporary folder. ``--data magnetic_tile`` uses ../shared/data/magnetic_tile instead (images
of 103-632 px a side, tiled at their own size). Each configuration trains and evaluates in its
own process (benchmarks/runner.py), so its peak RSS is its own; models with a backbone use the
pip EfficientNet-Lite0 weights. Prints one row per configuration:

  model | tiling | fit s | ms per full image (the evaluation's loader: batch_size images untiled, one
  image tiled) | ms per full image at batch 1 | peak RSS MiB (the process: training and
  evaluation) | image AUROC | pixel AUROC | AUPRO

Timings on a shared CPU are noisy (other jobs slow a run down, never speed it up): compare rows
of one invocation, and rerun before trusting small differences.

    python benchmarks/bench_tiling.py                          # PaDiM and STFPM on the synthetic set
    python benchmarks/bench_tiling.py --models padim autoencoder --tile 128 --stride 96
    python benchmarks/bench_tiling.py --data magnetic_tile --tile 96 --untiled-size 256
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from runner import RunFailed, run_isolated

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
LITE0 = "tf_efficientnet_lite0"
#: short schedules of the trained models (enough to compare tiled and untiled, not to converge)
SCHEDULES = {"stfpm": {"max_steps": 60, "batch_size": 16},
             "autoencoder": {"max_steps": 200, "batch_size": 16, "channels": [32, 64, 64], "latent_channels": 32}}


def synthetic_set(work: Path, args) -> tuple[Path, str]:
    from adlib.data.synthetic import make_surface_dataset

    root = make_surface_dataset(work / "data", n_train=args.n_train, n_test_good=args.n_test, n_test_bad=args.n_test,
                                height=args.height, width=args.width, defect_size=args.spot)
    return root, "surface"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "stfpm"])
    parser.add_argument("--data", choices=["synthetic", "magnetic_tile"], default="synthetic")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--tile", type=int, default=128, help="tile_size of the tiled runs")
    parser.add_argument("--stride", type=int, default=None, help="tile_stride (default: the tile, no overlap)")
    parser.add_argument("--blend", default="mean", choices=["mean", "max", "gaussian"])
    parser.add_argument("--tiles-per-image", type=int, default=None)
    parser.add_argument("--untiled-size", type=int, default=256, help="img_size of the untiled runs")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--spot", type=int, default=4, help="defect diameter (px) of the synthetic set")
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=10, help="normal and anomalous test images each")
    args = parser.parse_args()

    from adlib.data import index_dataset, save_manifest
    from adlib.models.registry import get_spec

    work = Path(tempfile.mkdtemp(prefix="adlib-bench-tiling-"))
    if args.data == "synthetic":
        root, category = synthetic_set(work, args)
    else:
        root, category = Path(args.data_root), "magnetic_tile"
        if not (root / category).is_dir():
            sys.exit(f"data set not found: {root / category} (this option needs ../shared/data)")
    manifest, cache = work / "manifest.parquet", work / "cache"
    save_manifest(index_dataset("mvtec", root, category, dataset="bench"), manifest)
    print(f"data: {args.data} ({root / category}); work dir {work}")

    tiling = {"tile_size": args.tile, "tile_stride": args.stride, "tile_blend": args.blend,
              "tiles_per_image": args.tiles_per_image}
    rows = []
    for model in args.models:
        base = dict(SCHEDULES.get(model, {}))
        if "backbone" in get_spec(model).model_defaults:
            base["backbone"] = LITE0
        for label, overrides in (("untiled", {**base, "img_size": args.untiled_size}),
                                 ("tiled", {**base, **{k: v for k, v in tiling.items() if v is not None}})):
            start = time.perf_counter()
            try:
                data = run_isolated(model, overrides, manifest, cache, work / "runs" / label, root)
            except RunFailed as err:
                print(f"{model} {label}: FAILED\n{err}")
                continue
            rows.append((model, label, overrides, data, time.perf_counter() - start))

    tiles = f"tile {args.tile}, stride {args.stride or args.tile}, {args.blend}"
    header = (f"{'model':12s} {'tiling':28s} {'fit s':>7s} {'ms/img':>8s} {'ms b1':>8s} {'RSS MiB':>8s} "
              f"{'img AUROC':>9s} {'px AUROC':>8s} {'AUPRO':>6s}")
    print(header)
    print("-" * len(header))
    fmt = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
    for model, label, overrides, data, _ in rows:
        m, f = data["metrics"], data["fit"]
        what = tiles if label == "tiled" else f"none ({args.untiled_size} px squares)"
        print(f"{model:12s} {what:28s} {f['fit_seconds']:7.1f} {m['inference_ms_batch']:8.1f} "
              f"{m['inference_ms_b1']:8.1f} {data.get('peak_rss_mb', f['peak_rss_mb']):8.0f} "
              f"{fmt(m['image_auroc'], '9.3f')} {fmt(m['pixel_auroc'], '8.3f')} {fmt(m['pixel_aupro'], '6.3f')}")
    for model, label, overrides, data, seconds in rows:
        print(f"  {model} {label}: overrides {overrides}; {data['fit']['steps']} steps; {seconds:.0f} s wall "
              f"(train + evaluate); load {data['metrics']['timing']['load_1min']}")


if __name__ == "__main__":
    main()
