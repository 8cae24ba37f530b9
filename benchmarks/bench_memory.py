"""Peak RSS per stage of registered models on a real data set, with fit and test time.

Default: PaDiM, PatchCore (coreset 0.01), STFPM (5 epochs), DFM and DFKDE on
../shared/data/magnetic_tile with the pip EfficientNet-Lite0 at 256 px, on the CPU. Each run is
a process of its own (benchmarks/runner.py) that records its peak RSS in every stage
(adlib.memory_probe): ``other`` (imports, model building and loading), ``features`` (the
one-pass collection) or ``training`` (gradient steps), ``fitting`` (finalize: Gaussians,
coreset, PCA, KDE), ``scoring`` (the test split), ``metrics`` (metrics and batch-1 latency),
``pictures``. ``CPU s`` is the process's user + system time (the whole run). With
``--repeats N`` each model runs N times: peaks and times are medians, and
the machine's load average at the start of each run is printed beside them (memory is robust
to other load on a shared CPU, times are not).

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --models padim --repeats 3 --max-train 250
    python benchmarks/bench_memory.py --models patchcore --set patchcore:coreset_sampling_ratio=0.1 \
        --train-images 4000          # magnetic tile's train images repeated with seeded augmentations

``--max-train N`` (``--max-test N``) keeps a seeded random N of the training (test) images (the
issue's sets have 210-247 training images); ``--train-images N`` writes N augmented copies of the training images (flips,
shifts of a few pixels, +-5% brightness) into a temporary folder and trains on those.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from runner import RunFailed, add_data_options, model_overrides, parse_sets, run_isolated

DEFAULT_MODELS = ["padim", "patchcore", "stfpm", "dfm", "dfkde"]
DEFAULT_SETS = ["patchcore:coreset_sampling_ratio=0.01", "stfpm:num_epochs=5"]
STAGES = ["other", "features", "training", "fitting", "scoring", "metrics", "pictures"]


def augmented_category(source: Path, category: str, count: int, img_size: int, out: Path, seed: int = 0) -> Path:
    """A copy of ``source/category`` whose train/good holds ``count`` seeded augmentations of its
    training images (``img_size`` px PNGs); test and ground_truth are linked, not copied."""
    import numpy as np
    from PIL import Image

    from adlib.data.files import list_images

    originals = list_images(source / category / "train" / "good")
    target = out / category / "train" / "good"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("test", "ground_truth"):
        (out / category / name).symlink_to(source / category / name)
    rng = np.random.default_rng(seed)
    pad = max(2, img_size // 64)  # shifts of up to 4 px at 256 px
    for i in range(count):
        image = np.asarray(Image.open(originals[i % len(originals)]).convert("RGB").resize((img_size, img_size)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if rng.random() < 0.5:
            image = image[::-1]
        dy, dx = rng.integers(-pad, pad + 1, size=2)
        image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
        image = np.clip(image.astype(np.float32) * rng.uniform(0.95, 1.05), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(target / f"aug_{i:05d}.png")
    return out


def keep_subset(manifest: Path, split: str, count: int, seed: int = 0) -> None:
    """Keep a seeded random ``count`` of the manifest's ``split`` images (the others unchanged)."""
    from adlib.data import load_manifest, save_manifest

    frame = load_manifest(manifest)
    rows = frame[frame["split"] == split]
    if count < len(rows):
        drop = rows.sample(n=len(rows) - count, random_state=seed).index
        save_manifest(frame.drop(index=drop).reset_index(drop=True), manifest)


def bank_size(run_dir: Path) -> int | None:
    """Rows of a saved model's memory bank (PatchCore), None for models without one."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as weights:
        if "memory_bank" not in weights.keys():
            return None
        return int(weights.get_slice("memory_bank").get_shape()[0])


def summarise(model: str, runs: list[dict], loads: list[float], bank: int | None) -> dict:
    """Medians over the runs of one model: stage peaks, whole-process peak, times, metrics."""
    peaks = {s: statistics.median(r["stage_peaks_mb"][s] for r in runs)
             for s in STAGES if s in runs[0]["stage_peaks_mb"]}
    metrics = runs[0]["metrics"]
    return {"model": model, "stages_mb": peaks,
            "peak_mb": statistics.median(max(r["stage_peaks_mb"].values()) for r in runs),
            "fit_s": statistics.median(r["fit"]["fit_seconds"] for r in runs),
            "test_s": statistics.median(r["metrics"]["inference_ms_batch"] * r["metrics"]["n_test"] / 1000 for r in runs),
            "eval_s": statistics.median(r["eval_seconds"] for r in runs),
            "cpu_s": statistics.median(r["cpu_seconds"] for r in runs),
            "fit_s_all": [round(r["fit"]["fit_seconds"], 1) for r in runs], "load": loads,
            "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics.get("pixel_auroc"),
            "num_train": runs[0]["fit"]["num_train_images"], "bank": bank}


def print_table(rows: list[dict]) -> None:
    stages = [s for s in STAGES if any(s in r["stages_mb"] for r in rows)]
    head = f"{'model':12s} " + " ".join(f"{s[:8]:>8s}" for s in stages)
    head += f" {'peak':>7s} {'fit s':>7s} {'test s':>7s} {'eval s':>7s} {'CPU s':>7s} {'img AUC':>7s} {'px AUC':>7s}  load"
    print("peak RSS per stage (MiB), medians over the repeats")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(f"{r['stages_mb'][s]:8.0f}" if s in r["stages_mb"] else f"{'':8s}" for s in stages)
        fmt = lambda v: f"{v:7.3f}" if v is not None else f"{'n/a':>7s}"  # noqa: E731
        loads = "/".join(f"{v:.1f}" for v in r["load"])
        print(f"{r['model']:12s} {cells} {r['peak_mb']:7.0f} {r['fit_s']:7.1f} {r['test_s']:7.1f} "
              f"{r['eval_s']:7.1f} {r['cpu_s']:7.1f} {fmt(r['image_auroc'])} {fmt(r['pixel_auroc'])}  {loads}")
    for r in rows:
        extra = f", memory bank {r['bank']:,} items" if r["bank"] is not None else ""
        print(f"  {r['model']}: {r['num_train']} training images, fit s per run {r['fit_s_all']}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    add_data_options(parser)
    parser.add_argument("--set", action="append", default=None,
                        help=f"MODEL:KEY=VALUE override (repeatable), on top of {' '.join(DEFAULT_SETS)}")
    parser.add_argument("--no-backbone-override", nargs="*", default=["autoencoder", "draem"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per model (medians reported)")
    parser.add_argument("--max-train", type=int, help="keep a seeded random N of the training images")
    parser.add_argument("--max-test", type=int, help="keep a seeded random N of the test images")
    parser.add_argument("--train-images", type=int, help="train on N augmented copies of the training images")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="run with keep_freed_memory=False (glibc's allocator defaults)")
    parser.add_argument("--seed", type=int, help="the runs' seed (default 0)")
    parser.add_argument("--scoring-batch-size", type=int,
                        help="images per scoring batch (default: the CPU's, adlib.run.loaders.CPU_SCORING_BATCH)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    settings = ({"keep_freed_memory": False} if args.release_freed_memory else {}) | (
        {"seed": args.seed} if args.seed is not None else {}) | (
        {"scoring_batch_size": args.scoring_batch_size} if args.scoring_batch_size else {})
    from adlib.run import prepare_data

    root = Path(args.data_root)
    if not (root / args.category).is_dir():
        sys.exit(f"data set not found: {root / args.category} (this benchmark needs ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="adlib-memory-"))
    if args.train_images:
        start = time.perf_counter()
        root = augmented_category(root, args.category, args.train_images, args.img_size, work / "data")
        print(f"{args.train_images} augmented training images: {time.perf_counter() - start:.0f} s")
    manifest, cache = work / "manifest.parquet", work / "cache"
    start = time.perf_counter()
    prepare_data({"name": "bench", "layout": "mvtec", "root": str(root)}, args.category, args.img_size, manifest, cache)
    for split, count in (("train", args.max_train), ("test", args.max_test)):
        if count:
            keep_subset(manifest, split, count)
    print(f"prepare (index + decode cache): {time.perf_counter() - start:.1f} s   work dir {work}")
    sets = parse_sets(DEFAULT_SETS + (args.set or []))  # later values win: --set adds to the defaults

    rows = []
    for model in args.models:
        overrides = model_overrides(model, args.img_size, sets, args.backbone, args.no_backbone_override)
        runs, loads = [], []
        try:
            for _ in range(max(1, args.repeats)):
                loads.append(round(os.getloadavg()[0], 1))
                runs.append(run_isolated(model, overrides, manifest, cache, work / "runs", root, stages=True,
                                         settings=settings or None))
        except RunFailed as err:
            print(f"{model}: FAILED\n{err}")
            continue
        rows.append(summarise(model, runs, loads, bank_size(work / "runs" / model)))
        print(f"  done {model}: overrides {overrides}; {json.dumps(rows[-1])}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
