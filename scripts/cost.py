"""Rule cost: accuracy against inference and fit cost, Pareto front marked."""
from adlib.reporting.cost import write_cost_view
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_cost_view(sm.input.leaderboard, sm.output.csv, sm.output.png, metric=sm.params.metric)
