# Aggregates over all runs, computed from the per-run files only (no model is loaded).


rule leaderboard:
    input:
        metrics=RUNS.run_files("metrics.json"),
        fit=RUNS.train_files("fit.json"),
        config=RUNS.train_files("config.json"),
        provenance=RUNS.train_files("provenance.json"),
    output:
        csv=report(
            P.aggregate("leaderboard.csv"),
            caption="../report/leaderboard.rst",
            category="Leaderboard",
            labels={"table": "all runs"},
        ),
        parquet=P.aggregate("leaderboard.parquet"),
        summary=report(
            P.aggregate("summary_by_model.csv"),
            caption="../report/summary.rst",
            category="Leaderboard",
            labels={"table": "per model"},
        ),
        ranks=P.aggregate("ranks.csv"),
        defects=report(
            P.aggregate("leaderboard_defects.csv"),
            caption="../report/leaderboard.rst",
            category="Leaderboard",
            labels={"table": "per defect type"},
        ),
    params:
        metric=CONFIG["report"]["rank_metric"],
    log:
        P.log("aggregate", "leaderboard"),
    benchmark:
        P.benchmark("aggregate", "leaderboard")
    script:
        "../scripts/leaderboard.py"


rule statistics:
    input:
        leaderboard=P.aggregate("leaderboard.parquet"),
        scores=RUNS.run_files("scores.parquet"),
    output:
        json=P.aggregate("statistics.json"),
        cd=report(
            P.aggregate("cd_diagram.png"),
            caption="../report/cd_diagram.rst",
            category="Ranking",
            labels={"figure": "critical difference"},
        ),
        ci=report(
            P.aggregate("bootstrap_ci.csv"),
            caption="../report/bootstrap.rst",
            category="Ranking",
            labels={"figure": "bootstrap CI"},
        ),
    params:
        metric=CONFIG["report"]["rank_metric"],
        alpha=CONFIG["report"]["alpha"],
        bootstrap=CONFIG["report"]["bootstrap"],
        confidence=CONFIG["report"]["confidence"],
        seed=CONFIG["report"]["seed"],
    log:
        P.log("aggregate", "statistics"),
    benchmark:
        P.benchmark("aggregate", "statistics")
    script:
        "../scripts/statistics.py"


rule cost:
    input:
        leaderboard=P.aggregate("leaderboard.parquet"),
    output:
        csv=P.aggregate("cost.csv"),
        png=report(
            P.aggregate("cost.png"),
            caption="../report/cost.rst",
            category="Cost",
            labels={"figure": "accuracy vs cost"},
        ),
    params:
        metric=CONFIG["report"]["rank_metric"],
    log:
        P.log("aggregate", "cost"),
    script:
        "../scripts/cost.py"


rule thresholds:
    input:
        metrics=RUNS.run_files("metrics.json"),
    output:
        csv=P.aggregate("thresholds.csv"),
        parquet=P.aggregate("thresholds.parquet"),
        md=report(
            P.aggregate("thresholds.md"),
            caption="../report/thresholds.rst",
            category="Thresholds",
            labels={"table": "threshold analysis"},
        ),
    log:
        P.log("aggregate", "thresholds"),
    benchmark:
        P.benchmark("aggregate", "thresholds")
    script:
        "../scripts/thresholds.py"
