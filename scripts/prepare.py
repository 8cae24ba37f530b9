"""Rule prepare: manifest + decoded-image cache of one data set category at one image size."""
from adlib.run import prepare_data
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0], sm.threads):
    prepare_data(sm.params.dataset, sm.wildcards.category, int(sm.wildcards.size), sm.output.manifest,
                 sm.params.cache_root, calibration_fraction=sm.params.calibration_fraction,
                 seed=sm.params.data_seed)
