"""Rule evaluate: score the test split of a trained run; metrics, thresholds, pictures."""
from pathlib import Path

from adlib.run import evaluate_run
from adlib.workflow import job_context, run_settings

sm = snakemake  # noqa: F821  (injected by Snakemake)
wc = sm.wildcards
with job_context(sm.log[0], sm.threads):
    # pictures and the results text are named after the workflow's label of the model
    evaluate_run(Path(sm.output.metrics).parent, sm.input.manifest, run_settings(sm.config, wc.seed),
                 cache_root=sm.params.cache_root, calibration=sm.params.calibration, progress=False,
                 title=f"{wc.dataset}_{wc.category}_{wc.model}", model_dir=Path(sm.input.weights).parent)
