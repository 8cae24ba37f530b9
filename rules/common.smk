# The one place where the configuration is validated and the run table is built.
# Rules below only look things up in RUNS; the logic lives in adlib.workflow (tested there).
import os

from adlib import workflow as wf

try:
    CONFIG = wf.validate_config(config, os.path.join(workflow.basedir, "config", "schema.yaml"))
    RUNS = wf.build_run_table(CONFIG)
except wf.ConfigError as err:
    raise WorkflowError(str(err)) from None
config.update(CONFIG)  # script adapters read the validated config, defaults filled

RUN = "results/runs/{dataset}/{category}/{model}/{seed}"
RUN_LOG = "{dataset}/{category}/{model}/{seed}"


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    category=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    model=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    seed=r"\d+",
    size=r"\d+",


def run_manifest(wildcards):
    return RUNS.manifest(wildcards.dataset, wildcards.category, wildcards.model, wildcards.seed)


AGGREGATE_OUTPUTS = [
    "results/aggregate/leaderboard.csv",
    "results/aggregate/leaderboard.parquet",
    "results/aggregate/summary_by_model.csv",
    "results/aggregate/ranks.csv",
    "results/aggregate/statistics.json",
    "results/aggregate/cd_diagram.png",
    "results/aggregate/bootstrap_ci.csv",
    "results/aggregate/cost.csv",
    "results/aggregate/cost.png",
    "results/aggregate/thresholds.csv",
    "results/aggregate/thresholds.parquet",
    "results/aggregate/thresholds.md",
]
ENSEMBLE_OUTPUTS = [
    f"results/ensemble/{name}"
    for name in (
        "candidates.csv",
        "correlation.csv",
        "correlation.png",
        "fusion_results.csv",
        "fusion_summary.csv",
        "ensemble.md",
        "ensemble.html",
    )
]
REPORT_OUTPUTS = ["results/report/index.html"]
