"""Rule ensemble: candidates by mean rank, score correlation, score-level fusion report."""
from pathlib import Path

from adlib.reporting.ensemble import write_ensemble_report
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_ensemble_report(sm.input.leaderboard, [Path(p).parent for p in sm.input.scores],
                          Path(sm.output.md).parent, top_k=sm.params.top_k,
                          normalizations=sm.params.normalizations, fusions=sm.params.fusions,
                          metric=sm.params.metric)
