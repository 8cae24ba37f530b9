#!/usr/bin/env python3
"""Estimate a full grid's cost in GPU-hours from a measured run's benchmark TSVs.

    python tools/slurm/estimate_cost.py results/benchmarks --categories 15 --seeds 1

Reads ``<benchmarks>/{train,evaluate,evaluate_image_level}/<dataset>/<category>/<model>/<seed>.tsv``
(the workflow's benchmark layout), averages the measured wall time of train + evaluate per
model over the categories and seeds that were run, and multiplies by the grid size
(``--categories`` x ``--seeds`` runs per model). Prints a Markdown table whose "measured"
columns come from the files and whose "grid" columns are extrapolated. Run it on benchmarks
of a run on the target GPU and data set (e.g. 2-3 MVTec AD categories) for a usable estimate;
docs/cluster.md says how.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

RULES = {"train": "train", "evaluate": "evaluate", "evaluate_image_level": "evaluate"}


def read_run_seconds(root: Path) -> dict[str, dict[tuple[str, str, str], dict[str, float]]]:
    """model -> (dataset, category, seed) -> {"train": s, "evaluate": s} from benchmark TSVs."""
    runs: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    for rule, phase in RULES.items():
        for tsv in sorted((root / rule).glob("*/*/*/*.tsv")):
            dataset, category, model = tsv.relative_to(root / rule).parts[:3]
            with tsv.open(newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
            try:
                seconds = float(rows[-1]["s"])
            except (IndexError, KeyError, ValueError):
                continue
            runs[model][(dataset, category, tsv.stem)][phase] = seconds
    return runs


def estimate(runs, categories: int, seeds: int, gpus_per_job: float = 1.0) -> list[dict]:
    rows = []
    for model, per_run in sorted(runs.items()):
        complete = [r for r in per_run.values() if "train" in r and "evaluate" in r]
        if not complete:
            continue
        train = sum(r["train"] for r in complete) / len(complete)
        evaluate = sum(r["evaluate"] for r in complete) / len(complete)
        grid_runs = categories * seeds
        rows.append({"model": model, "measured_runs": len(complete), "train_s": train, "evaluate_s": evaluate,
                     "run_gpu_h": (train + evaluate) * gpus_per_job / 3600.0, "grid_runs": grid_runs,
                     "grid_gpu_h": (train + evaluate) * gpus_per_job * grid_runs / 3600.0})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | runs measured | train s (measured mean) | evaluate s (measured mean) "
             "| GPU-h per run | grid runs | grid GPU-h (extrapolated) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['measured_runs']} | {r['train_s']:.0f} | {r['evaluate_s']:.0f} "
                     f"| {r['run_gpu_h']:.3f} | {r['grid_runs']} | {r['grid_gpu_h']:.1f} |")
    total = sum(r["grid_gpu_h"] for r in rows)
    lines.append(f"| **total** ({len(rows)} configurations) | | | | | {sum(r['grid_runs'] for r in rows)} "
                 f"| **{total:.1f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmarks", type=Path, nargs="?", default=Path("results/benchmarks"))
    parser.add_argument("--categories", type=int, default=15, help="categories in the full grid [15: MVTec AD]")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration [1]")
    args = parser.parse_args(argv)
    if not args.benchmarks.is_dir():
        print(f"error: {args.benchmarks} is not a folder; pass results/benchmarks of a finished run",
              file=sys.stderr)
        return 1
    rows = estimate(read_run_seconds(args.benchmarks), args.categories, args.seeds)
    if not rows:
        print(f"error: no run under {args.benchmarks} has both a train and an evaluate benchmark",
              file=sys.stderr)
        return 1
    sys.stdout.write(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
