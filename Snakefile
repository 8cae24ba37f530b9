# adlib benchmark workflow: dataset x category x model x seed runs, then aggregates and reports.
# Edit config/config.yaml (validated against config/schema.yaml) and run `snakemake --cores N`.
# docs/workflow.md explains the rules, the config and what reruns when.
from snakemake.utils import min_version

min_version("9")


configfile: "config/config.yaml"


report: "report/workflow.rst"


# Used only with --software-deployment-method conda (see the file for PYTHONPATH).
conda: "envs/adlib.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/aggregate.smk"
include: "rules/ensemble.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        AGGREGATE_OUTPUTS,
        ENSEMBLE_OUTPUTS,
        REPORT_OUTPUTS,
