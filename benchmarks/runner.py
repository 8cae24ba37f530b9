"""Train and evaluate one model in a process of its own (so its peak RSS is its own), and hand
back its numbers: the benchmarks' shared runner.

    from runner import run_isolated
    data = run_isolated("padim", {"backbone": "tf_efficientnet_lite0"}, manifest, cache, out, data_root)
    data["fit"], data["metrics"], data["eval_seconds"], data["first_scores"]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


class RunFailed(RuntimeError):
    """The model's process failed; the message ends with its stderr."""


def run_isolated(model: str, overrides: dict, manifest: Path, cache: Path, out: Path, data_root: str | Path,
                 pretrained: bool = True) -> dict:
    """``pretrained=False``: frozen backbones get seeded random weights (for networks whose weight
    files are not installed here, e.g. DINOv2; the results say so)."""
    cmd = [sys.executable, __file__, model, "--manifest", str(manifest), "--cache", str(cache), "--out", str(out),
           "--overrides", json.dumps(overrides), "--data-root", str(data_root), *([] if pretrained else ["--random-init"])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RunFailed(f"{model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(args: argparse.Namespace) -> None:
    import pandas as pd

    from adlib.run import evaluate_run, train_run
    from adlib.settings import Settings

    settings = Settings(data_root=args.data_root, output_dir=args.out, device="cpu", seed=0)
    run_dir = Path(args.out) / args.model
    train_run(args.manifest, args.model, json.loads(args.overrides), run_dir, settings, cache_root=args.cache,
              pretrained=not args.random_init, progress=False)
    start = time.perf_counter()
    evaluate_run(run_dir, args.manifest, settings, cache_root=args.cache, progress=False)
    eval_seconds = time.perf_counter() - start
    print(json.dumps({"fit": json.loads((run_dir / "fit.json").read_text()),
                      "metrics": json.loads((run_dir / "metrics.json").read_text()), "eval_seconds": eval_seconds,
                      "first_scores": pd.read_parquet(run_dir / "scores.parquet")["score"].head(8).tolist()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    for option in ("--manifest", "--cache", "--out", "--overrides", "--data-root"):
        parser.add_argument(option, required=True)
    parser.add_argument("--random-init", action="store_true", help="random-init frozen backbones (pretrained=False)")
    _worker(parser.parse_args())
