# One self-contained HTML page over all aggregates (`snakemake --report` builds the other report).


rule report:
    input:
        summary=P.aggregate("summary_by_model.csv"),
        statistics=P.aggregate("statistics.json"),
        cd=P.aggregate("cd_diagram.png"),
        cost=P.aggregate("cost.png"),
        thresholds=P.aggregate("thresholds.md"),
        ensemble=P.ensemble("ensemble.md"),
        diversity=P.ensemble("diversity.png"),  # embedded via ensemble.md
    output:
        html=report(
            P.report("index.html"),
            caption="../report/index.rst",
            category="Summary",
            labels={"page": "summary"},
        ),
    log:
        P.log("aggregate", "report"),
    script:
        "../scripts/report.py"
