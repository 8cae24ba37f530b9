"""Rule train: fit one model on one category (or every category of a data set) with one seed."""
from pathlib import Path

from adlib.run import train_run
from adlib.workflow import job_context, run_settings

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0], sm.threads):
    train_run(list(sm.input.manifests), sm.params.model, sm.params.overrides, Path(sm.output.config).parent,
              run_settings(sm.config, sm.wildcards.seed), cache_root=sm.params.cache_root,
              pretrained=sm.params.pretrained, progress=False)
