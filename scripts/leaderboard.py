"""Rule leaderboard: one row per run, per-model summary and per-category ranks."""
from pathlib import Path

from adlib.reporting.leaderboard import write_leaderboard
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_leaderboard([Path(p).parent for p in sm.input.metrics], sm.output.csv, sm.output.parquet,
                      sm.output.summary, sm.output.ranks, metric=sm.params.metric, defects_csv=sm.output.defects)
