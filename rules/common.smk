# The one place where the configuration is validated and the run table is built.
# Rules below only look things up in RUNS and take their paths from P (adlib.workflow.paths);
# the logic lives in adlib.workflow (tested there).
import os

from adlib import workflow as wf

try:
    CONFIG, RUNS = wf.load_workflow(config, os.path.join(workflow.basedir, "config", "schema.yaml"))
except wf.ConfigError as err:
    raise WorkflowError(str(err)) from None
config.update(CONFIG)  # script adapters read the validated config, defaults filled
P = RUNS.paths
RUN = P.run_template
RUN_KEY = wf.paths.RUN_KEY


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    category=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    model=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    seed=r"\d+",
    size=r"\d+",
    key=r"[0-9a-f]{12}",


def run_manifest(wildcards):
    return RUNS.manifest(wildcards.dataset, wildcards.category, wildcards.model, wildcards.seed)


def train_manifests(wildcards):
    return RUNS.train_manifests(wildcards.dataset, wildcards.category, wildcards.model, wildcards.seed)


def model_file(name):
    def inputs(wildcards):
        return RUNS.model_file(wildcards.dataset, wildcards.category, wildcards.model, wildcards.seed, name)

    return inputs


AGGREGATE_OUTPUTS = [
    P.aggregate(name)
    for name in (
        "leaderboard.csv",
        "leaderboard.parquet",
        "summary_by_model.csv",
        "ranks.csv",
        "leaderboard_defects.csv",
        "statistics.json",
        "cd_diagram.png",
        "bootstrap_ci.csv",
        "cost.csv",
        "cost.png",
        "thresholds.csv",
        "thresholds.parquet",
        "thresholds.md",
    )
]
ENSEMBLE_OUTPUTS = [
    P.ensemble(name)
    for name in (
        "candidates.csv",
        "diversity.csv",
        "diversity.png",
        "fusion_results.csv",
        "fusion_summary.csv",
        "weights.csv",
        "map_metrics.csv",
        "comparison.csv",
        "recommended_scores.parquet",
        "recommendation.json",
        "ensemble.md",
        "ensemble.html",
        "artifacts",
    )
]
REPORT_OUTPUTS = [P.report("index.html")]
