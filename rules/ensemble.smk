# Ensemble-candidate report: best models by mean rank, score correlation, score-level fusion.


rule ensemble:
    input:
        leaderboard="results/aggregate/leaderboard.parquet",
        scores=RUNS.run_files("scores.parquet"),
    output:
        candidates="results/ensemble/candidates.csv",
        correlation="results/ensemble/correlation.csv",
        correlation_png=report(
            "results/ensemble/correlation.png",
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "score correlation"},
        ),
        results="results/ensemble/fusion_results.csv",
        summary=report(
            "results/ensemble/fusion_summary.csv",
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "fusion summary"},
        ),
        md="results/ensemble/ensemble.md",
        html=report(
            "results/ensemble/ensemble.html",
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "ensemble report"},
        ),
    params:
        top_k=CONFIG["ensemble"]["top_k"],
        normalizations=CONFIG["ensemble"]["normalizations"],
        fusions=CONFIG["ensemble"]["fusions"],
        metric=CONFIG["report"]["rank_metric"],
    log:
        "results/logs/aggregate/ensemble.log",
    benchmark:
        "results/benchmarks/aggregate/ensemble.tsv"
    script:
        "../scripts/ensemble.py"
