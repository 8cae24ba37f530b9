# Score the test split with a trained run: scores, maps, metrics, thresholds and pictures.
# Models that produce anomaly maps also write maps.npz and overlays/; image-level-only models
# (see the registry) use the second rule, which differs only in those outputs. The trained model
# comes from the run's train directory (the run itself, or <dataset>/all for dataset-scope runs).


rule evaluate:
    input:
        weights=model_file("model.safetensors"),
        config=model_file("config.json"),
        splits=model_file("splits.json"),
        manifest=run_manifest,
    output:
        scores=f"{RUN}/scores.parquet",
        metrics=f"{RUN}/metrics.json",
        thresholds=report(
            f"{RUN}/results_{{dataset}}_{{category}}_{{model}}_thresholds.txt",
            caption="../report/run_thresholds.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "thresholds"},
        ),
        histogram=report(
            f"{RUN}/histogram_{{dataset}}_{{category}}_{{model}}_scores.png",
            caption="../report/run_histogram.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "score histogram"},
        ),
        curves=report(
            f"{RUN}/curves_{{dataset}}_{{category}}_{{model}}_roc_pr.png",
            caption="../report/run_curves.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "ROC / PR curves"},
        ),
        maps=f"{RUN}/maps.npz",
        overlays=report(
            directory(f"{RUN}/overlays"),
            patterns=["{name}.png"],
            caption="../report/run_overlays.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "overlay {name}"},
        ),
    params:
        model=lambda wc: RUNS.model_name(wc.model),
        calibration=CONFIG["calibration"]["method"],
        fingerprint=lambda wc: RUNS.eval_fingerprint(wc.model),
        cache_root=P.cache,
    wildcard_constraints:
        model=RUNS.model_pattern(produces_maps=True),
    log:
        P.log("evaluate", RUN_KEY),
    benchmark:
        P.benchmark("evaluate", RUN_KEY)
    threads: CONFIG["threads"]
    resources:
        gpu=1,
    script:
        "../scripts/evaluate.py"


use rule evaluate as evaluate_image_level with:
    output:
        scores=f"{RUN}/scores.parquet",
        metrics=f"{RUN}/metrics.json",
        thresholds=report(
            f"{RUN}/results_{{dataset}}_{{category}}_{{model}}_thresholds.txt",
            caption="../report/run_thresholds.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "thresholds"},
        ),
        histogram=report(
            f"{RUN}/histogram_{{dataset}}_{{category}}_{{model}}_scores.png",
            caption="../report/run_histogram.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "score histogram"},
        ),
        curves=report(
            f"{RUN}/curves_{{dataset}}_{{category}}_{{model}}_roc_pr.png",
            caption="../report/run_curves.rst",
            category="Runs",
            subcategory="{dataset} / {category}",
            labels={"model": "{model}", "seed": "{seed}", "figure": "ROC / PR curves"},
        ),
    wildcard_constraints:
        model=RUNS.model_pattern(produces_maps=False),
