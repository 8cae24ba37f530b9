"""Rule statistics: Friedman test, Nemenyi critical-difference diagram, bootstrap CIs."""
from pathlib import Path

from adlib.reporting.stats import write_statistics
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_statistics(sm.input.leaderboard, [Path(p).parent for p in sm.input.scores], sm.output.json,
                     sm.output.cd, sm.output.ci, metric=sm.params.metric, alpha=sm.params.alpha,
                     n_boot=sm.params.bootstrap, confidence=sm.params.confidence, seed=sm.params.seed)
