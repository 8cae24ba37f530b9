"""Rule thresholds: the four threshold methods across runs, oracle vs transferred."""
from pathlib import Path

from adlib.reporting.thresholds_summary import write_threshold_analysis
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_threshold_analysis([Path(p).parent for p in sm.input.metrics], sm.output.csv, sm.output.parquet,
                             sm.output.md)
