# Train one model on one category (or, for dataset-scope configurations, on every category of a
# data set: category "all") with one seed. `fingerprint` hashes the adlib sources of this model
# (its file, what it imports, the shared training modules): editing them reruns its runs.


rule train:
    input:
        manifests=train_manifests,
    output:
        weights=f"{RUN}/model.safetensors",
        config=f"{RUN}/config.json",
        provenance=f"{RUN}/provenance.json",
        fit=f"{RUN}/fit.json",
        splits=f"{RUN}/splits.json",
    params:
        model=lambda wc: RUNS.model_name(wc.model),
        overrides=lambda wc: RUNS.overrides(wc.model),
        pretrained=CONFIG["pretrained"],
        fingerprint=lambda wc: RUNS.train_fingerprint(wc.model),
        cache_root=P.cache,
    log:
        P.log("train", RUN_KEY),
    benchmark:
        P.benchmark("train", RUN_KEY)
    threads: CONFIG["threads"]
    resources:
        gpu=1,
    script:
        "../scripts/train.py"
