"""Rule evaluate: score the test split of a trained run; metrics, thresholds, pictures."""
from pathlib import Path

from adlib.pipeline import evaluate_run
from adlib.workflow import job_context, run_settings

sm = snakemake  # noqa: F821  (injected by Snakemake)
wc = sm.wildcards
# a model listed under a label (not its registry name) names its files after the label
title = {} if wc.model == sm.params.model else {"title": f"{wc.dataset}_{wc.category}_{wc.model}"}
with job_context(sm.log[0], sm.threads):
    evaluate_run(Path(sm.output.metrics).parent, sm.input.manifest, run_settings(sm.config, wc.seed),
                 cache_root=sm.params.cache_root, calibration=sm.params.calibration, progress=False, **title)
