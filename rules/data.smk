# One manifest + decoded-image cache per data set, category and image size, shared by all models.
# Synthetic data sets are generated here too (under results/data/<name>, once per category).


rule prepare:
    output:
        manifest="results/prepared/{dataset}/{category}/{size}/manifest.parquet",
    params:
        dataset=lambda wc: RUNS.prepare_config(wc.dataset),
        calibration_fraction=RUNS.calibration_fraction(),
        data_seed=CONFIG["data_seed"],
        cache_root="results/cache",
    log:
        "results/logs/prepare/{dataset}/{category}/{size}.log",
    benchmark:
        "results/benchmarks/prepare/{dataset}/{category}/{size}.tsv"
    threads: 1
    script:
        "../scripts/prepare.py"
