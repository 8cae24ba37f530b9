"""What a run trains on and holds out: the validation split, labelled training images, and
configurations that train one model over every category of a data set (scope "dataset")."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny import registered_variant

from adlib import Settings, train
from adlib.data import DataError, load_manifest
from adlib.data.synthetic import make_dataset
from adlib.reporting.leaderboard import leaderboard_row
from adlib.run import evaluate_run, prepare_data, train_run

FAST = {"img_size": 64, "backbone": "resnet18", "batch_size": 4}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset("mvtec", root / "mvtec", categories=("widget", "gear"), n_train=10, n_test_good=4, n_test_bad=8,
                 size=64, seed=0)
    return root


def _settings(data_root, out, seed=3):
    return Settings(data_root=data_root, output_dir=out, backbone_dir=out / "no-weights", device="cpu", seed=seed)


def _prepare(data_root, out, category="widget"):
    cfg = {"name": "mvtec", "layout": "mvtec", "root": str(data_root / "mvtec")}
    return prepare_data(cfg, category, 64, out / f"{category}.parquet", out / "cache")


def test_the_validation_split_shares_no_image_with_train_or_test(data_root, tmp_path):
    manifest_path = _prepare(data_root, tmp_path)
    run = train_run(manifest_path, "stfpm", {**FAST, "num_epochs": 2, "validation_fraction": 0.3, "validate_every": 1},
                    tmp_path / "run", _settings(data_root, tmp_path), cache_root=tmp_path / "cache",
                    pretrained=False, progress=False)
    splits = json.loads((run / "splits.json").read_text())
    manifest = load_manifest(manifest_path)
    train_paths = set(manifest[manifest.split == "train"].image_path)
    validation = set(splits["validation"])
    assert len(validation) == 3 and validation <= train_paths
    assert not validation & set(manifest[manifest.split != "train"].image_path)
    assert splits["num_train"] == len(train_paths) - 3
    fit = json.loads((run / "fit.json").read_text())
    assert fit["val_metric"] == "validation_loss" and len(fit["val_history"]) == 2
    assert fit["num_validation_images"] == 3 and fit["num_train_images"] == 7
    assert json.loads((run / "provenance.json").read_text())["validation"] == "validation"


def test_early_stopping_without_held_out_images_is_refused_before_training(data_root, tmp_path):
    manifest_path = _prepare(data_root, tmp_path)
    with pytest.raises(DataError, match="never reads the test split"):
        train_run(manifest_path, "stfpm", {**FAST, "validate_every": 1}, tmp_path / "run",
                  _settings(data_root, tmp_path), pretrained=False, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_labelled_configuration_never_evaluates_an_image_it_trained_on(data_root, tmp_path):
    manifest_path = _prepare(data_root, tmp_path)
    with registered_variant("padim-labelled-test", "padim", train_labels="labelled",
                            train={"labelled_fraction": 0.5}):
        settings = _settings(data_root, tmp_path)
        run = train_run(manifest_path, "padim-labelled-test", FAST, tmp_path / "run", settings,
                        pretrained=False, progress=False)
        evaluate_run(run, manifest_path, settings, progress=False)
        trained_on = set(json.loads((run / "splits.json").read_text())["labelled_train"])
        manifest = load_manifest(manifest_path)
        anomalous = manifest[(manifest.split == "test") & (manifest.label == 1)]
        assert len(trained_on) == 4 and trained_on <= set(anomalous.image_path)
        per_type = anomalous[anomalous.image_path.isin(trained_on)].groupby("defect_type").size()
        assert (per_type >= 1).all() and len(per_type) == anomalous.defect_type.nunique()
        scored = set(pd.read_parquet(run / "scores.parquet").image_path)
        assert not scored & trained_on and len(scored) == 12 - 4
        metrics = json.loads((run / "metrics.json").read_text())
        assert any("used for training" in note for note in metrics["notes"])
        row = leaderboard_row(run)  # not in a run-table layout: identity from the folder names
        assert row["supervision"] == "supervised"


def test_a_labelled_configuration_without_anomalies_to_move_is_a_clear_error(tmp_path):
    make_dataset("mvtec", tmp_path / "mv", categories=("one",), n_train=6, n_test_good=3, n_test_bad=1, size=32)
    cfg = {"name": "mv", "layout": "mvtec", "root": str(tmp_path / "mv")}
    manifest = prepare_data(cfg, "one", 32, tmp_path / "m.parquet", tmp_path / "cache")
    with registered_variant("padim-labelled-test", "padim", train_labels="labelled", train={"labelled_fraction": 0.5}):
        with pytest.raises(DataError, match="no anomalous test image that can move to training"):
            train_run(manifest, "padim-labelled-test", {**FAST, "img_size": 32}, tmp_path / "run",
                      _settings(tmp_path, tmp_path), pretrained=False, progress=False)


def test_a_dataset_scope_run_trains_once_and_reports_one_row_per_category(data_root, tmp_path):
    with registered_variant("padim-scope-test", "padim", scope="dataset"):
        results = train("mvtec", "all", "padim-scope-test", settings=_settings(data_root, tmp_path),
                        pretrained=False, progress=False, **FAST)
        assert sorted(r["category"] for r in results) == ["gear", "widget"]
        shared = tmp_path / "mvtec" / "all" / "padim-scope-test"
        assert (shared / "model.safetensors").is_file()
        assert not (tmp_path / "mvtec" / "gear" / "padim-scope-test" / "model.safetensors").exists()
        config = json.loads((shared / "config.json").read_text())
        assert config["category"] == "all" and config["categories"] == ["gear", "widget"]
        fit = json.loads((shared / "fit.json").read_text())
        assert fit["num_train_images"] == 20 and fit["passes"] == {"fit": 20}
        for category in ("gear", "widget"):
            run = tmp_path / "mvtec" / category / "padim-scope-test"
            scores = pd.read_parquet(run / "scores.parquet")
            assert set(scores.category) == {category}
            row = leaderboard_row(run)
            assert row["scope"] == "dataset" and row["model_name"] == "padim-scope-test"
            assert row["num_train_images"] == 20
