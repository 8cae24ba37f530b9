# Train one model on one category with one seed. `fingerprint` hashes the adlib sources of this
# model (its file, what it imports, the shared training modules): editing them reruns its runs.


rule train:
    input:
        manifest=run_manifest,
    output:
        weights=f"{RUN}/model.safetensors",
        config=f"{RUN}/config.json",
        provenance=f"{RUN}/provenance.json",
        fit=f"{RUN}/fit.json",
    params:
        model=lambda wc: RUNS.model_name(wc.model),
        overrides=lambda wc: RUNS.overrides(wc.model),
        pretrained=CONFIG["pretrained"],
        fingerprint=lambda wc: RUNS.train_fingerprint(wc.model),
        cache_root="results/cache",
    log:
        f"results/logs/train/{RUN_LOG}.log",
    benchmark:
        f"results/benchmarks/train/{RUN_LOG}.tsv"
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/train.py"
