# Ensemble-candidate report: best models by mean rank, score correlation, score-level fusion.


rule ensemble:
    input:
        leaderboard=P.aggregate("leaderboard.parquet"),
        scores=RUNS.run_files("scores.parquet"),
    output:
        candidates=P.ensemble("candidates.csv"),
        correlation=P.ensemble("correlation.csv"),
        correlation_png=report(
            P.ensemble("correlation.png"),
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "score correlation"},
        ),
        results=P.ensemble("fusion_results.csv"),
        summary=report(
            P.ensemble("fusion_summary.csv"),
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "fusion summary"},
        ),
        md=P.ensemble("ensemble.md"),
        html=report(
            P.ensemble("ensemble.html"),
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
        P.log("aggregate", "ensemble"),
    benchmark:
        P.benchmark("aggregate", "ensemble")
    script:
        "../scripts/ensemble.py"
