#!/usr/bin/env python3
"""Suggest SLURM memory and runtime per rule from a finished run's Snakemake benchmark TSVs.

    python tools/slurm/suggest_resources.py results/benchmarks > suggested.yaml

Reads every ``<benchmarks>/<rule>/**/*.tsv`` (the workflow writes one per job, under a folder
named after the rule), takes the largest peak memory (``max_rss``, MB) and wall time (``s``)
per rule, adds headroom and prints a ``set-resources:`` block to paste into
profiles/slurm/config.yaml. GPU memory is not in these files: see ``peak_cuda_mb`` in each
run's fit.json (or the leaderboard) when choosing a GPU type.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path


def read_benchmarks(root: Path) -> dict[str, list[tuple[float, float]]]:
    """Rule -> [(wall seconds, max_rss MB)] for every benchmark TSV under ``root/<rule>/``."""
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a folder; pass the workflow's benchmark folder "
                         "(results/benchmarks after a run)")
    found: dict[str, list[tuple[float, float]]] = {}
    for tsv in sorted(root.glob("*/**/*.tsv")):
        rule = tsv.relative_to(root).parts[0]
        with tsv.open(newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                try:
                    seconds, rss = float(row["s"]), float(row["max_rss"])
                except (KeyError, TypeError, ValueError):
                    # "NA" (job too short to sample) or not a Snakemake benchmark file
                    continue
                found.setdefault(rule, []).append((seconds, rss))
    return found


def suggest(found: dict[str, list[tuple[float, float]]], mem_headroom: float = 1.5,
            time_headroom: float = 2.0, min_mem_mb: int = 1000, min_runtime_min: int = 10) -> dict[str, dict]:
    """Rule -> {mem_mb, runtime (minutes), jobs, max_rss_mb, max_seconds} with headroom applied."""
    out = {}
    for rule, samples in sorted(found.items()):
        max_s = max(s for s, _ in samples)
        max_rss = max(r for _, r in samples)
        out[rule] = {
            "mem_mb": max(min_mem_mb, int(math.ceil(max_rss * mem_headroom / 500.0) * 500)),
            "runtime": max(min_runtime_min, int(math.ceil(max_s * time_headroom / 60.0))),
            "jobs": len(samples), "max_rss_mb": round(max_rss, 1), "max_seconds": round(max_s, 1),
        }
    return out


def to_yaml(suggestions: dict[str, dict], scale: float = 1.0) -> str:
    lines = ["set-resources:"]
    for rule, s in suggestions.items():
        runtime = int(math.ceil(s["runtime"] * scale))
        lines += [f"  {rule}:  # {s['jobs']} jobs measured: peak RSS {s['max_rss_mb']} MB, "
                  f"longest {s['max_seconds']} s" + (f" (runtime x{scale:g})" if scale != 1 else ""),
                  f"    mem_mb: {s['mem_mb']}", f"    runtime: {runtime}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmarks", type=Path, nargs="?", default=Path("results/benchmarks"))
    parser.add_argument("--mem-headroom", type=float, default=1.5, help="memory factor [1.5]")
    parser.add_argument("--time-headroom", type=float, default=2.0, help="runtime factor [2.0]")
    parser.add_argument("--scale-runtime", type=float, default=1.0,
                        help="extra runtime factor, e.g. 8 when the measured run was on a GPU 8x "
                             "faster than the cluster's, or for larger images [1]")
    args = parser.parse_args(argv)
    found = read_benchmarks(args.benchmarks)
    if not found:
        print(f"error: no Snakemake benchmark TSVs under {args.benchmarks}/<rule>/", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(suggest(found, args.mem_headroom, args.time_headroom), args.scale_runtime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
