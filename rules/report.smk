# One self-contained HTML page over all aggregates (`snakemake --report` builds the other report).


rule report:
    input:
        summary="results/aggregate/summary_by_model.csv",
        statistics="results/aggregate/statistics.json",
        cd="results/aggregate/cd_diagram.png",
        cost="results/aggregate/cost.png",
        thresholds="results/aggregate/thresholds.md",
        ensemble="results/ensemble/ensemble.md",
        correlation="results/ensemble/correlation.png",  # embedded via ensemble.md
    output:
        html=report(
            "results/report/index.html",
            caption="../report/index.rst",
            category="Summary",
            labels={"page": "summary"},
        ),
    log:
        "results/logs/aggregate/report.log",
    script:
        "../scripts/report.py"
