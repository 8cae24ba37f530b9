"""Rule ensemble_artifacts: the recommended ensemble of every data set x category x seed."""
from adlib.ensemble.artifact import build_recommended
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    build_recommended(sm.input.recommendation, sm.params.run_dirs, sm.output[0])
