"""The real Snakemake workflow on tiny synthetic configs in temporary directories (no mocking).

Dry runs check the planned grid and bad-input errors; the slow test runs everything, then checks
that only stale work reruns: nothing after a complete run; one model's runs after its override
or its source file changes; only the new runs after adding a category; only the missing work
after a failed run. A dataset-scope configuration (Dinomaly multi-class, built small) trains one
model over two categories, is evaluated and reported per category, and one category's changed
data reruns the shared training and every evaluation of it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from adlib.data.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = ("Snakefile", "rules", "scripts", "report", "profiles", "envs", "config/schema.yaml")
AGGREGATE_RULES = {"leaderboard", "statistics", "cost", "thresholds", "ensemble", "ensemble_artifacts", "report",
                   "all"}
#: one model with anomaly maps, one scoring whole images only (the two evaluate rules)
MAPS_MODEL, IMAGE_MODEL = "padim", "dfkde"


def tiny_config(**changes) -> dict:
    config = {
        "img_size": 32, "seeds": [0], "pretrained": False,
        "datasets": [{"name": "syn", "layout": "synthetic", "categories": ["widget"],
                      "options": {"n_train": 6, "n_test_good": 4, "n_test_bad": 4, "size": 32}}],
        "models": [{"name": MAPS_MODEL, "overrides": {"backbone": "tf_efficientnet_lite0", "n_features": 40}},
                   {"name": IMAGE_MODEL, "overrides": {"backbone": "tf_efficientnet_lite0", "layers": ["layer3"]}}],
        "calibration": {"method": "calibration", "fraction": 0.25},
        "report": {"bootstrap": 100},
    }
    config.update(changes)
    return config


def snakemake(workdir: Path, config: dict, *args: str, snakefile: Path = REPO / "Snakefile",
              env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real snakemake on ``config`` in ``workdir``; stdout and stderr together."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=workdir)


def planned(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run lists."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if not match:
            continue
        found = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        wildcards = dict(kv.split("=", 1) for kv in found.group(1).split(", ")) if found else {}
        jobs.append((match.group(1), wildcards))
    return jobs


def run_jobs(jobs) -> set[tuple[str, str, str]]:
    """(rule, category, model) of the per-run jobs."""
    return {(rule, w.get("category", ""), w.get("model", "")) for rule, w in jobs if rule not in AGGREGATE_RULES}


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


# ---------------------------------------------------------------------------------------------- dry runs
def test_dry_run_plans_the_whole_grid(tmp_path):
    config = tiny_config(seeds=[0, 1])
    config["datasets"][0]["categories"] = ["widget", "gear"]
    jobs = planned(check(snakemake(tmp_path, config, "-n")))
    counts = Counter(rule for rule, _ in jobs)
    assert counts["prepare"] == 2 and counts["train"] == 8
    assert counts["evaluate"] == 4 and counts["evaluate_image_level"] == 4
    assert all(counts[rule] == 1 for rule in AGGREGATE_RULES)
    assert {w["model"] for rule, w in jobs if rule == "evaluate_image_level"} == {IMAGE_MODEL}
    assert {w["size"] for rule, w in jobs if rule == "prepare"} == {"32"}


@pytest.mark.parametrize(("change", "expected"), [
    ({"models": ["padimm"]}, ["unknown model 'padimm'", "did you mean padim", "registered models:"]),
    ({"modelz": []}, ["config key '<top level>'", "unknown key(s) ['modelz']", "allowed keys:"]),
    ({"datasets": [{"name": "d", "layout": "mvtek", "root": "."}]},
     ["datasets[0].layout", "'mvtek' is not allowed", "allowed values: mvtec, visa, btad, custom, folder, synthetic"]),
    ({"datasets": [{"name": "d", "layout": "mvtec", "root": "no/such/folder"}]},
     ["root folder no/such/folder does not exist"]),
])
def test_bad_config_stops_the_dry_run_with_a_clear_error(tmp_path, change, expected):
    result = snakemake(tmp_path, tiny_config(**change), "-n")
    assert result.returncode != 0
    for text in expected:
        assert text in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_run_then_rerun_only_what_is_stale(tmp_path):
    repo = tmp_path / "repo"  # a private copy of the workflow and of adlib, so its sources can be edited
    for name in WORKFLOW:
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, target)
    shutil.copytree(REPO / "adlib", repo / "adlib", ignore=shutil.ignore_patterns("__pycache__"))
    work, env = tmp_path / "work", {"PYTHONPATH": str(repo)}
    data = tmp_path / "data"  # a data set on disk (MVTec layout), so the test can change its files
    make_dataset("mvtec", data, categories=("widget", "gear"), n_train=6, n_test_good=4, n_test_bad=4, size=32)

    def sm(config, *args):
        return snakemake(work, config, *args, snakefile=repo / "Snakefile", env=env)

    def disk_config(**changes):
        config = tiny_config(**changes)
        config["datasets"] = [{"name": "syn", "layout": "mvtec", "root": str(data), "categories": ["widget"]}]
        return config

    config = disk_config()
    check(sm(config))
    board = pd.read_csv(work / "results/aggregate/leaderboard.csv")
    assert sorted(board.model) == [IMAGE_MODEL, MAPS_MODEL] and board.image_auroc.notna().all()
    assert board.pixel_auroc.notna().tolist() == [m == MAPS_MODEL for m in board.model]
    run = work / "results/runs/syn/widget" / MAPS_MODEL / "0"
    assert (run / "maps.npz").is_file() and any((run / "overlays").iterdir())
    train_log = (work / "results/logs/train/syn/widget" / MAPS_MODEL / "0.log").read_text()
    for expected in ("resolved configuration", "weights: tf_efficientnet_lite0", "fit done in", "peak RSS"):
        assert expected in train_log, expected
    assert "evaluated" in (work / "results/logs/evaluate/syn/widget" / MAPS_MODEL / "0.log").read_text()
    assert (work / "results/benchmarks/train/syn/widget" / MAPS_MODEL / "0.tsv").is_file()
    assert "Recommended" in (work / "results/report/index.html").read_text()
    lb_mtime = (work / "results/aggregate/leaderboard.csv").stat().st_mtime

    # a complete run leaves nothing to do
    assert "Nothing to be done" in check(sm(config, "-n"))

    # one model's override: only its runs and the aggregates
    changed = disk_config()
    changed["models"][0]["overrides"]["n_features"] = 30
    jobs = planned(check(sm(changed, "-n")))
    assert run_jobs(jobs) == {("train", "widget", MAPS_MODEL), ("evaluate", "widget", MAPS_MODEL)}
    assert {"leaderboard", "ensemble", "report"} <= {rule for rule, _ in jobs}

    # one model's source file: only its runs
    source = repo / "adlib" / "models" / f"{IMAGE_MODEL}.py"
    original = source.read_text()
    source.write_text(original + "\n# an edit\n")
    jobs = planned(check(sm(config, "-n")))
    assert run_jobs(jobs) == {("train", "widget", IMAGE_MODEL), ("evaluate_image_level", "widget", IMAGE_MODEL)}
    source.write_text(original)
    assert "Nothing to be done" in check(sm(config, "-n"))

    # a new category: only its runs
    more = disk_config()
    more["datasets"][0]["categories"] = ["widget", "gear"]
    jobs = planned(check(sm(more, "-n")))
    assert run_jobs(jobs) == {("prepare", "gear", ""), ("train", "gear", MAPS_MODEL), ("train", "gear", IMAGE_MODEL),
                              ("evaluate", "gear", MAPS_MODEL), ("evaluate_image_level", "gear", IMAGE_MODEL)}

    # changed data (an image added, a mask replaced): that category is prepared, trained and evaluated again
    train_dir = data / "widget" / "train" / "good"
    shutil.copy(sorted(train_dir.iterdir())[0], train_dir / "extra.png")
    jobs = planned(check(sm(config, "-n")))
    assert run_jobs(jobs) == {("prepare", "widget", ""), ("train", "widget", MAPS_MODEL),
                              ("train", "widget", IMAGE_MODEL), ("evaluate", "widget", MAPS_MODEL),
                              ("evaluate_image_level", "widget", IMAGE_MODEL)}
    (train_dir / "extra.png").unlink()
    assert "Nothing to be done" in check(sm(config, "-n"))
    mask = sorted((data / "widget" / "ground_truth").rglob("*.png"))[0]
    mask.write_bytes(mask.read_bytes())  # same bytes, new modification time: a replaced file
    assert ("prepare", "widget", "") in run_jobs(planned(check(sm(config, "-n"))))
    check(sm(config))

    # a second study in the same folder, with its own results folder, leaves this one alone
    other = disk_config(results="results_other")
    other["models"] = other["models"][:1]
    check(sm(other))
    assert (work / "results_other/aggregate/leaderboard.csv").is_file()
    assert "Nothing to be done" in check(sm(config, "-n"))
    lb_mtime = (work / "results/aggregate/leaderboard.csv").stat().st_mtime

    # a bad override stops the dry run itself, before any job
    bad = disk_config()
    bad["models"].append({"name": "patchcore", "overrides": {"backbone": "no_such_backbone"}})
    result = sm(bad, "-n")
    assert result.returncode != 0 and "unknown backbone 'no_such_backbone'" in result.stdout
    assert "Traceback" not in result.stdout

    # a run failing at run time (a NaN loss) keeps the completed runs and aggregates; the next call
    # does only the missing work
    unstable = {"backbone": "tf_efficientnet_lite0", "max_steps": 2, "batch_size": 2}
    broken = disk_config()
    broken["models"].append({"name": "stfpm", "overrides": {**unstable, "lr": 1.0e30}})
    result = sm(broken)
    assert result.returncode != 0 and "Error in rule train" in result.stdout
    assert (work / "results/aggregate/leaderboard.csv").stat().st_mtime == lb_mtime
    assert (run / "metrics.json").is_file()
    fixed = disk_config()
    fixed["models"].append({"name": "stfpm", "overrides": unstable})
    jobs = planned(check(sm(fixed, "-n")))
    assert run_jobs(jobs) == {("train", "widget", "stfpm"), ("evaluate", "widget", "stfpm")}

    # Snakemake's own HTML report
    check(sm(config, "--report", str(work / "report.html")))
    html = (work / "report.html").read_text()
    assert "leaderboard.csv" in html and "cd_diagram.png" in html and "overlay" in html


# ---------------------------------------------------------------------------------------------- image sizes
#: fastflow-cait as registered (448 px, block 40 of CaiT-M48) but built small: same code path
SMALL_CAIT = {"name": "fastflow-cait", "overrides": {"backbone_kwargs": {"depth": 2}, "vit_block": 1, "flow_steps": 2,
                                                      "batch_size": 2, "max_steps": 1}}


def test_models_of_different_registered_sizes_prepare_each_size_once(tmp_path):
    config = tiny_config(img_size=None, models=[{"name": "padim", "overrides": {"backbone": "tf_efficientnet_lite0"}},
                                                SMALL_CAIT])
    jobs = planned(check(snakemake(tmp_path, config, "-n")))
    prepared = sorted(w["size"] for rule, w in jobs if rule == "prepare")
    assert prepared == ["256", "448"]


@pytest.mark.slow
def test_fastflow_cait_trains_at_its_registered_448_px(tmp_path):
    config = tiny_config(img_size=None, models=[SMALL_CAIT])
    check(snakemake(tmp_path, config))
    run = tmp_path / "results/runs/syn/widget/fastflow-cait/0"
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["img_size"] == 448 and saved["model"]["backbone"] == "cait_m48_448"
    assert list((tmp_path / "results/prepared/syn").glob("*/widget/448/manifest.parquet"))
    assert json.loads((run / "metrics.json").read_text())["image_auroc"] is not None


# ---------------------------------------------------------------------------------------------- dataset scope
#: Dinomaly's multi-class configuration (scope "dataset") built small: the shared tiny ViT, 32 px cut to 28
SMALL_DINOMALY = {"name": "dinomaly-small-224-multiclass",
                  "overrides": {"backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
                                "target_layers": [0, 1], "groups": [[0], [1]], "decoder_depth": 2,
                                "img_size": 32, "center_crop": 28, "batch_size": 4, "max_steps": 2}}


def dataset_scope_config() -> dict:
    config = tiny_config(models=[SMALL_DINOMALY])
    config["datasets"][0]["categories"] = ["widget", "gear"]
    return config


def test_a_dataset_scope_model_plans_one_train_job_and_one_evaluation_per_category(tmp_path):
    jobs = planned(check(snakemake(tmp_path, dataset_scope_config(), "-n")))
    model = SMALL_DINOMALY["name"]
    assert run_jobs(jobs) == {("prepare", "widget", ""), ("prepare", "gear", ""), ("train", "all", model),
                              ("evaluate", "widget", model), ("evaluate", "gear", model)}


@pytest.mark.slow
def test_a_dataset_scope_model_trains_once_and_reports_per_category(tmp_path):
    data = tmp_path / "data"  # on disk (MVTec layout), so the test can change one category's files
    make_dataset("mvtec", data, categories=("widget", "gear"), n_train=6, n_test_good=4, n_test_bad=4, size=32)
    config = dataset_scope_config()
    config["datasets"] = [{"name": "syn", "layout": "mvtec", "root": str(data), "categories": ["widget", "gear"]}]
    check(snakemake(tmp_path, config))
    model = SMALL_DINOMALY["name"]
    shared = tmp_path / "results/runs/syn/all" / model / "0"
    saved = json.loads((shared / "config.json").read_text())
    assert saved["category"] == "all" and saved["categories"] == ["gear", "widget"]
    assert saved["train"]["center_crop"] == 28 and saved["train"]["max_steps"] == 2
    fit = json.loads((shared / "fit.json").read_text())
    assert fit["num_train_images"] == 12 and fit["steps"] == 2  # 6 normal images of each category
    board = pd.read_csv(tmp_path / "results/aggregate/leaderboard.csv")
    assert sorted(board.category) == ["gear", "widget"] and set(board.model) == {model}
    assert set(board.scope) == {"dataset"} and set(board.supervision) == {"unsupervised"}
    assert board.image_auroc.notna().all() and board.pixel_auroc.notna().all()
    for category in ("gear", "widget"):
        run = tmp_path / "results/runs/syn" / category / model / "0"
        assert not (run / "model.safetensors").exists()  # evaluated with the shared model
        assert json.loads((run / "metrics.json").read_text())["model_dir"] == f"../../../all/{model}/0"
        assert set(pd.read_parquet(run / "scores.parquet").category) == {category}
        assert np.load(run / "maps.npz")["maps"].shape[-2:] == (28, 28)  # maps at the crop, like the masks

    # one category's data changes: its preparation, the shared training and every evaluation of the
    # shared model rerun; the other category's preparation does not
    train_dir = data / "gear" / "train" / "good"
    shutil.copy(sorted(train_dir.iterdir())[0], train_dir / "extra.png")
    jobs = planned(check(snakemake(tmp_path, config, "-n")))
    assert run_jobs(jobs) == {("prepare", "gear", ""), ("train", "all", model), ("evaluate", "widget", model),
                              ("evaluate", "gear", model)}
