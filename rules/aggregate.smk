# Aggregates over all runs, computed from the per-run files only (no model is loaded).


rule leaderboard:
    input:
        metrics=RUNS.run_files("metrics.json"),
        fit=RUNS.run_files("fit.json"),
        config=RUNS.run_files("config.json"),
        provenance=RUNS.run_files("provenance.json"),
    output:
        csv=report(
            "results/aggregate/leaderboard.csv",
            caption="../report/leaderboard.rst",
            category="Leaderboard",
            labels={"table": "all runs"},
        ),
        parquet="results/aggregate/leaderboard.parquet",
        summary=report(
            "results/aggregate/summary_by_model.csv",
            caption="../report/summary.rst",
            category="Leaderboard",
            labels={"table": "per model"},
        ),
        ranks="results/aggregate/ranks.csv",
    params:
        metric=CONFIG["report"]["rank_metric"],
    log:
        "results/logs/aggregate/leaderboard.log",
    benchmark:
        "results/benchmarks/aggregate/leaderboard.tsv"
    script:
        "../scripts/leaderboard.py"


rule statistics:
    input:
        leaderboard="results/aggregate/leaderboard.parquet",
        scores=RUNS.run_files("scores.parquet"),
    output:
        json="results/aggregate/statistics.json",
        cd=report(
            "results/aggregate/cd_diagram.png",
            caption="../report/cd_diagram.rst",
            category="Ranking",
            labels={"figure": "critical difference"},
        ),
        ci=report(
            "results/aggregate/bootstrap_ci.csv",
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
        "results/logs/aggregate/statistics.log",
    benchmark:
        "results/benchmarks/aggregate/statistics.tsv"
    script:
        "../scripts/statistics.py"


rule cost:
    input:
        leaderboard="results/aggregate/leaderboard.parquet",
    output:
        csv="results/aggregate/cost.csv",
        png=report(
            "results/aggregate/cost.png",
            caption="../report/cost.rst",
            category="Cost",
            labels={"figure": "accuracy vs cost"},
        ),
    params:
        metric=CONFIG["report"]["rank_metric"],
    log:
        "results/logs/aggregate/cost.log",
    script:
        "../scripts/cost.py"


rule thresholds:
    input:
        metrics=RUNS.run_files("metrics.json"),
    output:
        csv="results/aggregate/thresholds.csv",
        parquet="results/aggregate/thresholds.parquet",
        md=report(
            "results/aggregate/thresholds.md",
            caption="../report/thresholds.rst",
            category="Thresholds",
            labels={"table": "threshold analysis"},
        ),
    log:
        "results/logs/aggregate/thresholds.log",
    benchmark:
        "results/benchmarks/aggregate/thresholds.tsv"
    script:
        "../scripts/thresholds.py"
