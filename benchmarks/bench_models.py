"""Benchmark registered models on a real data set against the bare backbone forward ("floor").

Default: PaDiM, PatchCore (coreset 0.1) and STFPM on ../shared/data/magnetic_tile with the
pip-installed EfficientNet-Lite0 at 256 px, on the CPU. Each model runs in its own process so
peak RSS is its own. Prints one table row per model:

  fit s | s/step | test s | ms/img b1 | ms/img bN | peak RSS MiB | image AUROC | pixel AUROC | AUPRO |
  (fit+test)/floor

With ``--repeats N`` every model runs N times and the floor is timed N times; the fastest of
each is reported (other load on a shared machine only ever slows a run down).

    python benchmarks/bench_models.py                       # issue 3 set
    python benchmarks/bench_models.py --models padim --repeats 3
    python benchmarks/bench_models.py --models supersimplenet dinomaly-small-224 --no-backbone-override dinomaly-small-224 \
        --random-init dinomaly-small-224 --set dinomaly-small-224:max_steps=20   # DINOv2 weights are not installed
    python benchmarks/bench_models.py --models dfkde dfm fastflow-resnet18 draem autoencoder \
        --set fastflow-resnet18:num_epochs=2 --set draem:num_epochs=1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from runner import RunFailed, add_data_options, model_overrides, parse_sets, run_isolated



def backbone_floor(manifest: Path, cache: Path, backbone: str, layers: list[str], img_size: int, batch: int,
                   repeats: int = 2) -> float:
    """Seconds of the bare frozen backbone forward over every train and test image (batch
    ``batch``), the fastest of ``repeats`` passes."""
    import torch

    from adlib.allocator import reuse_freed_memory
    from adlib.backbones import FeatureExtractor
    from adlib.data import ImageCache, ImageDataset, load_manifest

    frame = load_manifest(manifest)
    frame = frame[frame["split"].isin(["train", "test"])].reset_index(drop=True)
    dataset = ImageDataset(frame, img_size, cache=ImageCache.build(frame, cache, img_size))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    extractor = FeatureExtractor(backbone, layers, pretrained=True)
    reuse_freed_memory()  # the same allocator set-up as the runs (adlib.pipeline.job_device)
    times = []
    with torch.no_grad():
        extractor(images[:batch])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                extractor(images[i:i + batch])
            times.append(time.perf_counter() - start)
    return min(times)  # other load only ever slows it down: the fastest pass is the floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore", "stfpm"])
    add_data_options(parser)
    parser.add_argument("--set", action="append", default=["stfpm:num_epochs=3"],
                        help="MODEL:KEY=VALUE override (repeatable); default stfpm:num_epochs=3")
    parser.add_argument("--no-backbone-override", nargs="*", default=["autoencoder", "draem"],
                        help="models that have no backbone option")
    parser.add_argument("--repeats", type=int, default=1, help="runs per model and floor passes (fastest kept)")
    parser.add_argument("--backbone-dir", default=None,
                        help="backbone directory of the runs (default ./backbones; pip weight packages are always "
                             "found), e.g. one holding an EfficientAD teacher")
    parser.add_argument("--random-init", nargs="*", default=[],
                        help="models whose frozen backbone gets random weights (no weight file here, e.g. DINOv2); "
                             "their rows are marked 'random-init'")
    args = parser.parse_args()

    from adlib.models.registry import get_spec
    from adlib.run import prepare_data

    root = Path(args.data_root)
    if not (root / args.category).is_dir():
        sys.exit(f"data set not found: {root / args.category} (this benchmark needs ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="adlib-bench-"))
    manifest, cache = work / "manifest.parquet", work / "cache"
    start = time.perf_counter()
    prepare_data({"name": "bench", "layout": "mvtec", "root": str(root)}, args.category, args.img_size, manifest, cache)
    print(f"prepare (index + decode cache): {time.perf_counter() - start:.1f} s   work dir {work}")
    sets = parse_sets(args.set)

    rows = []
    for model in args.models:
        overrides = model_overrides(model, args.img_size, sets, args.backbone, args.no_backbone_override)
        layers = get_spec(model).model_defaults.get("layers", ["layer2", "layer3"])
        try:
            runs = [run_isolated(model, overrides, manifest, cache, work / "runs", root, backbone_dir=args.backbone_dir,
                                 pretrained=model not in args.random_init) for _ in range(max(1, args.repeats))]
        except RunFailed as err:
            print(f"{model}: FAILED\n{err}")
            continue
        data = min(runs, key=lambda d: d["fit"]["fit_seconds"] + d["eval_seconds"])
        floor = backbone_floor(manifest, cache, overrides.get("backbone", args.backbone), list(layers),
                               args.img_size, int(data["metrics"]["batch_size"]), repeats=max(2, args.repeats)) \
            if "backbone" in overrides else None
        rows.append((model, overrides, data, floor))

    header = (f"{'model':22s} {'fit s':>7s} {'s/step':>7s} {'test s':>7s} {'ms b1':>7s} {'ms bN':>7s} {'RSS MiB':>8s} "
              f"{'img AUROC':>9s} {'px AUROC':>8s} {'AUPRO':>6s} {'floor s':>7s} {'ratio':>6s}")
    print(header)
    print("-" * len(header))
    for model, overrides, data, floor in rows:
        m, f = data["metrics"], data["fit"]
        test_s = m["inference_ms_batch"] * m["n_test"] / 1000.0
        ratio = (f["fit_seconds"] + test_s) / floor if floor else None
        fmt = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
        per_step = f["fit_seconds"] / f["steps"] if f.get("steps") else None
        print(f"{model:22s} {f['fit_seconds']:7.1f} {fmt(per_step, '7.2f')} {test_s:7.1f} {m['inference_ms_b1']:7.1f} "
              f"{m['inference_ms_batch']:7.1f} {f['peak_rss_mb']:8.0f} {fmt(m['image_auroc'], '9.3f')} "
              f"{fmt(m['pixel_auroc'], '8.3f')} {fmt(m['pixel_aupro'], '6.3f')} {fmt(floor, '7.1f')} "
              f"{fmt(ratio, '6.2f')}")
    for model, overrides, data, _ in rows:
        random = "; RANDOM-INIT frozen backbone" if model in args.random_init else ""
        print(f"  {model}: overrides {overrides}; epochs run {data['fit']['epochs_run']}, steps {data['fit']['steps']}, "
              f"test images {data['metrics']['n_test']}{random}")


if __name__ == "__main__":
    main()
