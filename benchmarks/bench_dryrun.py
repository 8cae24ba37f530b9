"""Time `snakemake -n` on a synthetic grid of >= 1,000 runs (nothing is trained).

Two numbers:
  * plan: a dry run with no results yet (the DAG of every prepare/train/evaluate/aggregate job);
  * no-op: a dry run when every output exists and is newer than its inputs (what a user waits
    for before "Nothing to be done"). The outputs are empty placeholder files created from the
    first dry run's job list, with modification times in rule order.

Usage: python benchmarks/bench_dryrun.py [--runs 1000] [--seeds 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
#: rules in dependency order: placeholder outputs get increasing modification times
STAGES = ("prepare", "train", "evaluate", "evaluate_image_level", "leaderboard", "thresholds", "statistics",
          "cost", "ensemble", "report")


def grid_config(n_runs: int, seeds: int) -> dict:
    from adlib.models.registry import list_models

    models = list_models()
    categories = math.ceil(n_runs / (len(models) * seeds))
    return {"img_size": 64, "seeds": list(range(seeds)), "pretrained": False,
            "datasets": [{"name": "grid", "layout": "synthetic",
                          "categories": [f"cat{i:03d}" for i in range(categories)]}],
            "models": models}


def dry_run(workdir: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "-n", "--cores", "2"]
    start = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(out.stdout[-4000:])
    return elapsed, out.stdout


def create_outputs(workdir: Path, log: str) -> int:
    """Empty placeholders for every planned output, older stages older."""
    base, count = time.time(), 0  # newer than every script and source file
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", log):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        outputs = re.search(r"^\s+output: (.*)$", block, re.M)
        if not rule or not outputs or rule.group(1) not in STAGES:
            continue
        stamp = base + STAGES.index(rule.group(1))
        for name in outputs.group(1).split(", "):
            path = workdir / name
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
            os.utime(path, (stamp, stamp))
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="at least this many runs")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        config = grid_config(args.runs, args.seeds)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        n_runs = len(config["datasets"][0]["categories"]) * len(config["models"]) * args.seeds
        plan_s, log = dry_run(workdir)
        jobs = re.search(r"^total\s+(\d+)$", log, re.M)
        n_files = create_outputs(workdir, log)
        noop_s, noop_log = dry_run(workdir)
        assert "Nothing to be done" in noop_log, noop_log[-3000:]
        print(f"grid: {len(config['datasets'][0]['categories'])} categories x {len(config['models'])} models x "
              f"{args.seeds} seeds = {n_runs} runs, {jobs.group(1) if jobs else '?'} jobs, {n_files} output files")
        print(f"snakemake -n, nothing built yet (plan every job): {plan_s:.1f} s")
        print(f"snakemake -n, everything up to date (no-op):       {noop_s:.1f} s")


if __name__ == "__main__":
    main()
