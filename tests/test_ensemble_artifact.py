"""The deployable ensemble on real tiny runs (adlib.run on synthetic data): ``adlib ensemble
build``, ``adlib predict ENSEMBLE_DIR`` equal to the report's fusion, maps of different sizes,
refusal when a member run is missing or changed, atomic writes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from adlib.cli import main as cli
from adlib.data import load_manifest
from adlib.data.synthetic import make_dataset
from adlib.ensemble.artifact import EnsembleError, build_ensemble, build_recommended, load_ensemble
from adlib.ensemble.pixels import pixel_metrics, read_masks
from adlib.ensemble.report import write_ensemble_report
from adlib.ensemble.runs import read_maps
from adlib.run import evaluate_run, prepare_data, train_run
from adlib.settings import Settings

#: label -> (registry name, overrides): maps at 64 and 32 px, and an image-level model
MEMBERS = {
    "padim": ("padim", {"img_size": 64, "backbone": "resnet18", "n_features": 20, "batch_size": 8}),
    "dfm": ("dfm", {"img_size": 32, "backbone": "resnet18", "layer": "layer2", "pooling_kernel_size": 2}),
    "dfkde": ("dfkde", {"img_size": 32, "backbone": "resnet18"}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one torch thread is many times faster than two busy ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread):
    """Runs in the workflow layout ``runs/syn/widget/<label>/0`` with a calibration split."""
    root = tmp_path_factory.mktemp("study")
    make_dataset("mvtec", root / "data", categories=("widget",), n_train=10, n_test_good=8, n_test_bad=8, size=64,
                 seed=0)
    settings = Settings(data_root=root, output_dir=root, backbone_dir=root / "no-weights", device="cpu", seed=0)
    dataset = {"name": "syn", "layout": "mvtec", "root": str(root / "data"), "options": {}}
    manifests, runs = {}, {}
    for label, (name, overrides) in MEMBERS.items():
        size = overrides["img_size"]
        if size not in manifests:
            manifests[size] = prepare_data(dataset, "widget", size, root / f"prepared/{size}/manifest.parquet",
                                           root / "cache", calibration_fraction=0.4, seed=0)
        run = root / "runs/syn/widget" / label / "0"
        train_run(manifests[size], name, overrides, run, settings, cache_root=root / "cache", pretrained=False,
                  progress=False)
        evaluate_run(run, manifests[size], settings, cache_root=root / "cache", calibration="calibration",
                     progress=False)
        runs[label] = run
    return root, runs, manifests[64]


def _predict(ensemble_dir, images, out, tmp_path, *extra) -> pd.DataFrame:
    assert cli(["predict", str(ensemble_dir), *map(str, images), "--out", str(out), "--device", "cpu",
                "--backbone-dir", str(tmp_path), *extra]) == 0
    return pd.read_csv(out).set_index("image_path")


def test_predictions_of_the_recommended_ensemble_equal_the_report(study, tmp_path):
    root, runs, manifest = study
    rec = write_ensemble_report(runs.values(), tmp_path / "report", manifests=[manifest], top_k=3, n_boot=100)
    build_recommended(tmp_path / "report/recommendation.json", list(runs.values()), tmp_path / "artifacts")
    ensemble_dir = tmp_path / "artifacts/syn/widget/0"
    assert json.loads((tmp_path / "artifacts/index.json").read_text())["ensembles"][0]["directory"] == "syn/widget/0"
    reported = pd.read_parquet(tmp_path / "report/recommended_scores.parquet")
    test = reported[reported.split == "test"].set_index("image_path")
    predicted = _predict(ensemble_dir, test.index, tmp_path / "pred.csv", tmp_path)
    np.testing.assert_allclose(predicted.loc[test.index, "score"], test.ensemble_score, rtol=1e-5, atol=1e-5)
    ensemble = load_ensemble(ensemble_dir)
    assert [m.label for m in ensemble.members] == rec["members"]
    threshold = ensemble.fitted.thresholds["f1_percentile"]
    assert (predicted["anomalous"] == (predicted["score"] >= threshold)).all()
    assert ensemble.fitted.map_members  # every pair has a model with maps: the fused maps give the pixel metrics
    fused = np.load(tmp_path / "pred.maps.npz")
    order = [list(fused["image_path"]).index(p) for p in test.index]
    masks = read_masks(load_manifest(manifest), list(test.index), ensemble.fitted.map_size)
    metrics = pd.read_csv(tmp_path / "report/map_metrics.csv")
    row = metrics[(metrics.entry == "ensemble") & (metrics.defect_type == "all")].iloc[0]
    assert pixel_metrics(fused["maps"][order], masks)["pixel_aupro"] == pytest.approx(row.pixel_aupro, abs=1e-4)


def test_map_fusion_of_models_with_different_map_sizes(study, tmp_path):
    root, runs, manifest = study
    out = build_ensemble([runs["padim"], runs["dfm"], runs["dfkde"]], tmp_path / "ens", normalization="zscore",
                         fusion="weighted")
    fitted = load_ensemble(out).fitted
    assert fitted.map_members == ["padim", "dfm"] and fitted.map_size == (64, 64)
    assert any("dfkde score whole images only" in n for n in fitted.notes)
    assert read_maps(runs["dfm"], "test")[0].shape[-1] == 32
    images = sorted(read_maps(runs["padim"], "test")[1])
    predicted = _predict(out, images, tmp_path / "p.csv", tmp_path, "--overlays", str(tmp_path / "overlays"))
    assert {"score_padim", "score_dfm", "score_dfkde"} <= set(predicted.columns)
    maps = np.load(tmp_path / "p.maps.npz")
    assert maps["maps"].shape == (len(images), 64, 64) and np.isfinite(maps["maps"]).all()
    stored = {}
    for label in ("padim", "dfm"):
        values, paths = read_maps(runs[label], "test")
        stored[label] = values[[list(paths).index(p) for p in maps["image_path"]]]
    np.testing.assert_allclose(maps["maps"], fitted.fuse_maps(stored), rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == len(images)


def test_predicting_with_a_missing_or_changed_member_fails_clearly(study, tmp_path, capsys):
    root, runs, _ = study
    copy = tmp_path / "runs"
    shutil.copytree(root / "runs", copy)
    members = [copy / "syn/widget" / m / "0" for m in ("padim", "dfkde")]
    out = build_ensemble(members, tmp_path / "ens")
    image = read_maps(members[0], "test")[1][0]
    args = ["predict", str(out), image, "--out", str(tmp_path / "p.csv"), "--device", "cpu"]

    weights = members[1] / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + b" ")
    with pytest.raises(EnsembleError, match=r"member run 'dfkde' .* changed since the ensemble was built"):
        load_ensemble(out)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "model.safetensors differs" in err and "adlib ensemble build" in err
    weights.write_bytes(original)
    load_ensemble(out)  # restored: usable again

    shutil.rmtree(members[0])
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "member run 'padim'" in err and "is missing" in err
    assert not (tmp_path / "p.csv").exists()


def test_build_writes_atomically_and_checks_its_members(study, tmp_path):
    root, runs, _ = study
    target = tmp_path / "ens"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    build_ensemble([runs["padim"], runs["dfm"]], target, normalization="rank", fusion="max")
    assert sorted(p.name for p in target.iterdir()) == ["ensemble.json"]
    before = (target / "ensemble.json").read_text()
    with pytest.raises(ValueError, match="unknown fusion 'median'"):
        build_ensemble([runs["padim"], runs["dfm"]], target, fusion="median")
    with pytest.raises(ValueError, match="member labels must differ"):
        build_ensemble([runs["padim"], runs["padim"]], target)
    assert (target / "ensemble.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]  # no temporary folders left
    record = json.loads(before)
    assert [len(m["content_hash"]) for m in record["members"]] == [64, 64]
    assert record["fitted"]["fit_split"] == "calibration" and record["fitted"]["thresholds"]["percentile_95"]

    other = tmp_path / "other"
    shutil.copytree(runs["dfm"], other / "dfm")
    frame = pd.read_parquet(other / "dfm/scores.parquet")
    frame.loc[frame.index[0], "image_path"] = "/elsewhere.png"
    frame.to_parquet(other / "dfm/scores.parquet")
    with pytest.raises(ValueError, match="scored different test images"):
        build_ensemble([runs["padim"], other / "dfm"], tmp_path / "bad")
