# Ensemble report (candidates, diversity, fusion rules, recommended ensemble vs best single model,
# fused maps), chosen on the calibration split; then the recommended ensemble of every
# data set x category x seed as a deployable directory (`adlib predict DIR images/`).


rule ensemble:
    input:
        scores=RUNS.run_files("scores.parquet"),
        metrics=RUNS.run_files("metrics.json"),
        maps=RUNS.map_files(),
        config=RUNS.train_files("config.json"),
        manifests=RUNS.category_manifests(),
    output:
        candidates=P.ensemble("candidates.csv"),
        diversity=P.ensemble("diversity.csv"),
        diversity_png=report(
            P.ensemble("diversity.png"),
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "diversity"},
        ),
        results=P.ensemble("fusion_results.csv"),
        summary=report(
            P.ensemble("fusion_summary.csv"),
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "fusion summary"},
        ),
        weights=P.ensemble("weights.csv"),
        map_metrics=P.ensemble("map_metrics.csv"),
        comparison=report(
            P.ensemble("comparison.csv"),
            caption="../report/ensemble.rst",
            category="Ensemble",
            labels={"figure": "ensemble vs best single model"},
        ),
        scores=P.ensemble("recommended_scores.parquet"),
        recommendation=P.ensemble("recommendation.json"),
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
        metric=CONFIG["ensemble"]["selection_metric"],
        bootstrap=CONFIG["report"]["bootstrap"],
        confidence=CONFIG["report"]["confidence"],
        seed=CONFIG["report"]["seed"],
    log:
        P.log("aggregate", "ensemble"),
    benchmark:
        P.benchmark("aggregate", "ensemble")
    script:
        "../scripts/ensemble.py"


rule ensemble_artifacts:
    input:
        recommendation=P.ensemble("recommendation.json"),
        weights=RUNS.train_files("model.safetensors"),
        config=RUNS.train_files("config.json"),
        scores=RUNS.run_files("scores.parquet"),
        metrics=RUNS.run_files("metrics.json"),
        maps=RUNS.map_files(),
    output:
        directory(P.ensemble("artifacts")),
    params:
        run_dirs=RUNS.run_dirs(),
    log:
        P.log("aggregate", "ensemble_artifacts"),
    script:
        "../scripts/ensemble_artifacts.py"
