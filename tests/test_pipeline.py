"""End to end through the public API and CLI on a tiny synthetic MVTec-layout data set."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from adlib import Settings, train
from adlib.cli import main as cli
from adlib.data.synthetic import make_dataset

FAST = {"img_size": 64, "backbone": "resnet18", "batch_size": 8}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset("mvtec", root / "mvtec", categories=("widget",), n_train=10, n_test_good=5, n_test_bad=5,
                 size=64, seed=0)
    return root


def _settings(data_root, out):
    return Settings(data_root=data_root, output_dir=out, backbone_dir=out / "no-weights", device="cpu", seed=3)


@pytest.fixture(scope="module")
def padim_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    [result] = train("mvtec", "widget", "padim", settings=_settings(data_root, out), pretrained=False,
                     progress=False, **FAST)
    return out, result


def test_run_directory_has_every_artifact(padim_run):
    out, result = padim_run
    run = out / "mvtec" / "widget" / "padim"
    assert result["run_dir"] == str(run)
    for name in ("model.safetensors", "config.json", "provenance.json", "fit.json", "scores.parquet",
                 "maps.npz", "metrics.json", "results_mvtec_widget_padim_thresholds.txt",
                 "histogram_mvtec_widget_padim_scores.png", "curves_mvtec_widget_padim_roc_pr.png"):
        assert (run / name).is_file(), name
    overlays = sorted(p.name for p in (run / "overlays").glob("*.png"))
    assert any("_normal_" in n for n in overlays) and any("_defect-" in n for n in overlays)
    assert not list(run.rglob(".*.tmp*")), "temporary files left behind"

    scores = pd.read_parquet(run / "scores.parquet")
    assert list(scores.columns) == ["image_path", "category", "defect_type", "label", "split", "score"]
    assert len(scores) == 10 and set(scores["label"]) == {0, 1}
    maps = np.load(run / "maps.npz")
    assert maps["maps"].dtype == np.float16 and maps["maps"].shape == (10, 64, 64)
    assert list(maps["image_path"]) == list(scores["image_path"])

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert set(metrics["thresholds"]) == {"f1_percentile", "f1_uniform", "roc_youden", "percentile_95"}
    assert metrics["transferred_thresholds"] is None
    assert metrics["inference_ms_b1"] > 0 and metrics["inference_ms_batch"] > 0
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["random_backbone"] is True and prov["seed"] == 3 and prov["torch_version"]
    fit = json.loads((run / "fit.json").read_text())
    assert fit["fit_seconds"] > 0 and fit["peak_rss_mb"] > 0 and fit["num_parameters"] > 0
    text = (run / "results_mvtec_widget_padim_thresholds.txt").read_text()
    assert "=== Image-level Results ===" in text and "=== Confusion Matrix (F1 Threshold) ===" in text


def test_same_seed_gives_identical_metrics(padim_run, data_root, tmp_path):
    out, first = padim_run
    [second] = train("mvtec", "widget", "padim", settings=_settings(data_root, tmp_path), pretrained=False,
                     progress=False, **FAST)
    for key in ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupro", "thresholds"):
        assert first[key] == second[key], key
    a = pd.read_parquet(out / "mvtec/widget/padim/scores.parquet")["score"]
    b = pd.read_parquet(tmp_path / "mvtec/widget/padim/scores.parquet")["score"]
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())


def test_calibration_split_gives_transferred_thresholds(data_root, tmp_path):
    [result] = train("mvtec", "widget", "padim", settings=_settings(data_root, tmp_path), pretrained=False,
                     progress=False, calibration="calibration", calibration_fraction=0.4, **FAST)
    assert result["transferred_thresholds"]["percentile_95"]["threshold"] is not None
    scores = pd.read_parquet(tmp_path / "mvtec/widget/padim/scores.parquet")
    assert set(scores["split"]) == {"test", "calibration"}


def test_cli_predict_list_models_and_bad_option(padim_run, data_root, tmp_path, capsys):
    out, _ = padim_run
    run = out / "mvtec" / "widget" / "padim"
    images = data_root / "mvtec" / "widget" / "test"
    csv = tmp_path / "pred.csv"
    assert cli(["predict", str(run), str(images), "--out", str(csv), "--overlays", str(tmp_path / "ov"),
                "--backbone-dir", str(tmp_path)]) == 0
    table = pd.read_csv(csv)
    assert len(table) == 10 and table["anomalous"].dtype == bool
    assert table["threshold_method"].eq("f1_percentile").all()
    assert len(list((tmp_path / "ov").glob("*.png"))) == 10

    assert cli(["list-models", "--family", "memory"]) == 0
    listed = capsys.readouterr().out
    assert "padim" in listed and "stfpm" not in listed

    assert cli(["train", "mvtec", "widget", "padim", "--set", "n_featurez=3", "--data-root", str(data_root),
                "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "n_featurez" in err and "Model options" in err


def test_cli_train_then_evaluate(data_root, tmp_path, capsys):
    args = ["--data-root", str(data_root), "--output-dir", str(tmp_path), "--device", "cpu"]
    assert cli(["train", "mvtec", "widget", "padim", "--random-backbone", "--set", "img_size=64",
                "--set", "backbone=resnet18", *args]) == 0
    assert "image AUROC" in capsys.readouterr().out
    run = tmp_path / "mvtec" / "widget" / "padim"
    (run / "metrics.json").unlink()
    assert cli(["evaluate", str(run), "--manifest", str(tmp_path / "mvtec/widget/manifest.parquet"), *args]) == 0
    assert (run / "metrics.json").is_file()


def test_unknown_dataset_names_where_it_looked(tmp_path):
    from adlib.data import DataError

    with pytest.raises(DataError, match="assumed layout 'mvtec' and looked for"):
        train("mvtec", "widget", "padim", settings=_settings(tmp_path, tmp_path), pretrained=False)
