"""Rule report: one self-contained HTML page over all aggregates."""
from adlib.reporting.summary import write_summary_report
from adlib.workflow import job_context

sm = snakemake  # noqa: F821  (injected by Snakemake)
with job_context(sm.log[0]):
    write_summary_report(sm.output.html, summary_csv=sm.input.summary, statistics_json=sm.input.statistics,
                         cd_png=sm.input.cd, cost_png=sm.input.cost, thresholds_md=sm.input.thresholds,
                         ensemble_md=sm.input.ensemble)
