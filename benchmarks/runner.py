"""Train and evaluate one model in a process of its own (so its peak RSS is its own), and hand
back its numbers: the benchmarks' shared runner.

    from runner import run_isolated
    data = run_isolated("padim", {"backbone": "tf_efficientnet_lite0"}, manifest, cache, out, data_root)
    data["fit"], data["metrics"], data["eval_seconds"], data["first_scores"]
    data["peak_rss_mb"]  # of the whole process: training and evaluation

``settings`` sets fields of the run's :class:`adlib.settings.Settings` (e.g.
``{"keep_freed_memory": False}``). With ``stages=True`` the process also records its peak RSS
per stage (:mod:`adlib.memory_probe`): ``data["stage_peaks_mb"]`` (``fit["peak_rss_mb"]`` then
covers only the last stage of training); ``data["cpu_seconds"]`` is its user + system time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


#: the project's shared real data sets (../shared/data beside the repository)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The options every real-data benchmark takes: data root, category, backbone, image size."""
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--img-size", type=int, default=256)


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``MODEL:KEY=VALUE`` command-line overrides -> ``{model: {key: value}}`` (values as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        model, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        out.setdefault(model, {})[key] = yaml.safe_load(value)
    return out


def model_overrides(model: str, img_size: int, sets: dict[str, dict], backbone: str,
                    no_backbone_override: list[str]) -> dict:
    """A benchmark's overrides of one model: the image size, the ``--set`` values, and the
    benchmark backbone where the model takes one."""
    from adlib.models.registry import get_spec

    overrides = {"img_size": img_size, **sets.get(model, {})}
    if "backbone" in get_spec(model).model_defaults and model not in no_backbone_override:
        overrides.setdefault("backbone", backbone)
    return overrides


class RunFailed(RuntimeError):
    """The model's process failed; the message ends with its stderr."""


def run_isolated(model: str, overrides: dict, manifest: Path, cache: Path, out: Path, data_root: str | Path, *,
                 stages: bool = False, settings: dict | None = None, backbone_dir: str | Path | None = None,
                 pretrained: bool = True) -> dict:
    """``pretrained=False``: frozen backbones get seeded random weights (for networks whose weight
    files are not installed here, e.g. DINOv2; the results say so)."""
    cmd = [sys.executable, __file__, model, "--manifest", str(manifest), "--cache", str(cache), "--out", str(out),
           "--overrides", json.dumps(overrides), "--data-root", str(data_root),
           "--settings", json.dumps(settings or {})] + (["--stages"] if stages else [])
    if backbone_dir is not None:
        cmd += ["--backbone-dir", str(backbone_dir)]
    if not pretrained:
        cmd.append("--random-init")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RunFailed(f"{model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(args: argparse.Namespace) -> None:
    import pandas as pd

    from adlib import memory_probe
    from adlib.run import evaluate_run, train_run
    from adlib.settings import Settings

    if args.stages and not memory_probe.enable():
        sys.exit("--stages: this system cannot reset the peak RSS (/proc/self/clear_refs); Linux only")
    extra = {"backbone_dir": args.backbone_dir} if args.backbone_dir else {}
    settings = Settings(**{"data_root": args.data_root, "output_dir": args.out, "device": "cpu", "seed": 0,
                           **json.loads(args.settings), **extra})
    run_dir = Path(args.out) / args.model
    train_run(args.manifest, args.model, json.loads(args.overrides), run_dir, settings, cache_root=args.cache,
              pretrained=not args.random_init, progress=False)
    start = time.perf_counter()
    evaluate_run(run_dir, args.manifest, settings, cache_root=args.cache, progress=False)
    eval_seconds = time.perf_counter() - start
    from adlib.training import peak_rss_mb

    print(json.dumps({"fit": json.loads((run_dir / "fit.json").read_text()), "peak_rss_mb": peak_rss_mb(),
                      "metrics": json.loads((run_dir / "metrics.json").read_text()), "eval_seconds": eval_seconds,
                      "first_scores": pd.read_parquet(run_dir / "scores.parquet")["score"].head(8).tolist(),
                      "stage_peaks_mb": memory_probe.stage_peaks(), "cpu_seconds": _cpu_seconds()}))


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (less sensitive to other load than wall time)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    for option in ("--manifest", "--cache", "--out", "--overrides", "--data-root"):
        parser.add_argument(option, required=True)
    parser.add_argument("--settings", default="{}", help="Settings fields as JSON")
    parser.add_argument("--stages", action="store_true", help="record the peak RSS per stage")
    parser.add_argument("--backbone-dir", default=None)
    parser.add_argument("--random-init", action="store_true", help="random-init frozen backbones (pretrained=False)")
    _worker(parser.parse_args())
