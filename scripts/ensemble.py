"""Rule ensemble: the ensemble report, chosen on the calibration split."""
from pathlib import Path

from adlib.ensemble.report import write_ensemble_report
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_ensemble_report([Path(p).parent for p in sm.input.scores], Path(sm.output.md).parent,
                          manifests=sm.input.manifests, top_k=sm.params.top_k,
                          normalizations=sm.params.normalizations, fusions=sm.params.fusions,
                          metric=sm.params.metric, n_boot=sm.params.bootstrap, confidence=sm.params.confidence,
                          seed=sm.params.seed)
