# One manifest + decoded-image cache per data set, category and image size, shared by all models.
# Synthetic data sets are generated here too (under <results>/data/<name>, once per category).
# `data_fingerprint` (names, sizes, mtimes of the category's files) reprepares changed data.


rule prepare:
    output:
        manifest=P.manifest,
    params:
        dataset=lambda wc: RUNS.prepare_config(wc.dataset),
        data_fingerprint=lambda wc: RUNS.data_fingerprint(wc.dataset, wc.category),
        calibration_fraction=RUNS.calibration_fraction(),
        data_seed=CONFIG["data_seed"],
        cache_root=P.cache,
    log:
        P.log("prepare", "{dataset}/{key}/{category}/{size}"),
    benchmark:
        P.benchmark("prepare", "{dataset}/{key}/{category}/{size}")
    threads: 1
    script:
        "../scripts/prepare.py"
