"""Record the metrics of every model on a real data set with short schedules, to compare two
versions of the code (same seed, same threads, CPU).

    python benchmarks/metrics_snapshot.py --out before.json
    ... change the code ...
    python benchmarks/metrics_snapshot.py --out after.json --compare before.json

Each model trains in its own process on ../shared/data/magnetic_tile (pip EfficientNet-Lite0
where a model takes a backbone) with the short schedule in ``SCHEDULES``, then evaluates; the
JSON holds image AUROC/AUPR, pixel AUROC, AUPRO and the first test scores per model.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from runner import RunFailed, run_isolated

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
LITE0 = {"backbone": "tf_efficientnet_lite0"}
#: short schedules: enough to exercise every training path, not to reach paper accuracy
SCHEDULES = {
    "padim": LITE0,
    "patchcore": {**LITE0, "coreset_sampling_ratio": 0.01},
    "dfkde": LITE0,
    "dfm": LITE0,
    "stfpm": {**LITE0, "max_steps": 4},
    "fastflow-resnet18": {**LITE0, "max_steps": 4},
    "autoencoder": {"max_steps": 4},
    "draem": {"base_width": 16, "disc_base_width": 16, "batch_size": 4, "max_steps": 2},
}
METRICS = ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="an earlier snapshot to compare with")
    parser.add_argument("--models", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--category", default="magnetic_tile")
    args = parser.parse_args()
    from adlib.run import prepare_data

    work = Path(tempfile.mkdtemp(prefix="adlib-snapshot-"))
    manifest, cache = work / "manifest.parquet", work / "cache"
    prepare_data({"name": "snapshot", "layout": "mvtec", "root": args.data_root}, args.category, 256, manifest, cache)
    results = {}
    for model in args.models:
        try:
            data = run_isolated(model, {"img_size": 256, **SCHEDULES[model]}, manifest, cache, work / "runs",
                                args.data_root)
            results[model] = {**{k: data["metrics"].get(k) for k in METRICS}, "first_scores": data["first_scores"]}
        except RunFailed as err:
            results[model] = {"error": str(err)}
        print(model, results[model] if "error" not in results[model] else "FAILED", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        for model, now in results.items():
            then = before.get(model, {})
            diffs = {k: (then.get(k), now.get(k)) for k in (*METRICS, "first_scores") if then.get(k) != now.get(k)}
            print(f"{model:20s} {'identical' if not diffs else diffs}")


if __name__ == "__main__":
    main()
