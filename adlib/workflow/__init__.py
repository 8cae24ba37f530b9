"""What the Snakemake workflow needs from Python, one job per module:

* :mod:`~adlib.workflow.paths`: every path template of the workflow (rules use only these);
* :mod:`~adlib.workflow.config`: config validation against the schema and the registry;
* :mod:`~adlib.workflow.runs`: the run table (dataset x category x model x seed, train jobs);
* :mod:`~adlib.workflow.fingerprints`: source fingerprints (Snakemake does not see library edits);
* :mod:`~adlib.workflow.jobs`: the job context of the script adapters.

The Snakefile calls :func:`validate_config` and :func:`build_run_table` once, in
``rules/common.smk``; rules only look things up in the returned :class:`RunTable`. Everything
here is plain Python, tested without Snakemake.
"""
from adlib.workflow.config import SYNTHETIC, ConfigError, layout_options, validate_config
from adlib.workflow.fingerprints import (EVAL_SHARED_MODULES, TRAIN_SHARED_MODULES, evaluation_fingerprint,
                                         model_fingerprint, source_files)
from adlib.workflow.jobs import job_context, run_settings
from adlib.workflow.paths import Paths
from adlib.workflow.runs import Run, RunTable, build_run_table, load_workflow, resolve_categories

__all__ = ["EVAL_SHARED_MODULES", "SYNTHETIC", "TRAIN_SHARED_MODULES", "ConfigError", "Paths", "Run", "RunTable",
           "build_run_table", "evaluation_fingerprint", "load_workflow", "job_context", "layout_options", "model_fingerprint",
           "resolve_categories", "run_settings", "source_files", "validate_config"]
