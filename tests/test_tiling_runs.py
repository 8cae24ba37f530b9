"""Tiled runs end to end (train, evaluate, predict): a small defect on large non-square images is
found with tiling and missed without it, for a memory model (PaDiM) and a trained one (the
autoencoder); tiled runs round-trip through their saved weights."""
from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest

from adlib.data import index_dataset, save_manifest
from adlib.data.synthetic import make_surface_dataset
from adlib.reporting.leaderboard import leaderboard_row
from adlib.run import evaluate, evaluate_run, predict_images, scoring, train_run
from adlib.settings import Settings

#: 128 x 160 images with 3 px spots: resized to 64 px the spots shrink to about one pixel
HEIGHT, WIDTH, SPOT = 128, 160, 3


@pytest.fixture(scope="module")
def surface(tmp_path_factory):
    work = tmp_path_factory.mktemp("surface")
    root = make_surface_dataset(work / "data", n_train=6, n_test_good=3, n_test_bad=3, height=HEIGHT, width=WIDTH,
                                defect_size=SPOT)
    save_manifest(index_dataset("mvtec", root, "surface"), work / "manifest.parquet")
    return work


@pytest.fixture(autouse=True)
def quick_latency(monkeypatch):
    """The batch-1 latency is timed on one image once (the evaluation's default is 8 images x 5)."""
    monkeypatch.setattr(evaluate, "latency_ms_batch1", functools.partial(scoring.latency_ms_batch1, n=1, passes=1))


def _settings(work) -> Settings:
    return Settings(data_root=work, output_dir=work / "out", backbone_dir=work / "no-weights", device="cpu", seed=0)


def _train_and_evaluate(work, model: str, label: str, overrides: dict):
    run = work / "out" / "surface" / "surface" / label / "0"
    train_run(work / "manifest.parquet", model, overrides, run, _settings(work), cache_root=work / "cache",
              pretrained=False, progress=False)
    evaluate_run(run, work / "manifest.parquet", _settings(work), cache_root=work / "cache", progress=False)
    return run, json.loads((run / "metrics.json").read_text())


def test_padim_finds_a_small_defect_only_when_tiled(surface, tmp_path):
    resnet = {"backbone": "resnet18"}
    untiled_run, untiled = _train_and_evaluate(surface, "padim", "padim", {**resnet, "img_size": 64})
    run, tiled = _train_and_evaluate(surface, "padim", "padim-tiled", {**resnet, "tile_size": 32})
    assert tiled["pixel_aupro"] > untiled["pixel_aupro"] + 0.2, (tiled["pixel_aupro"], untiled["pixel_aupro"])
    assert tiled["image_auroc"] >= untiled["image_auroc"]

    # evaluated at full resolution; the stored maps keep the images' aspect ratio
    maps = np.load(run / "maps.npz")["maps"]
    assert maps.shape == (6, 102, 128) and np.isfinite(maps).all()
    assert json.loads((run / "config.json").read_text())["train"]["tile_size"] == 32
    assert list((run / "overlays").glob("*.png"))
    shards = [p for p in (surface / "cache" / "mvtec" / "surface" / "full").iterdir() if p.is_dir()]
    assert len(shards) == 1  # one shard of the whole category serves training and evaluation
    row, plain = leaderboard_row(run), leaderboard_row(untiled_run)
    assert (row["model"], row["tile_size"], row["tile_stride"], row["tile_blend"], row["tile_image_size"]) == \
        ("padim-tiled", 32, 32, "mean", "full")
    assert plain["tile_size"] is None and plain["model"] == "padim"

    # the saved run predicts new images exactly as it scored them
    scores = pd.read_parquet(run / "scores.parquet")
    table = predict_images(run, list(scores["image_path"]), _settings(surface), out_csv=tmp_path / "scores.csv")
    np.testing.assert_array_equal(table["score"].to_numpy(), scores["score"].to_numpy())


def test_a_trained_autoencoder_finds_a_small_defect_only_when_tiled(surface):
    small = {"channels": [16, 32, 32], "latent_channels": 16, "max_steps": 100, "batch_size": 8}
    _, untiled = _train_and_evaluate(surface, "autoencoder", "autoencoder", {**small, "img_size": 64})
    _, tiled = _train_and_evaluate(surface, "autoencoder", "autoencoder-tiled",
                                   {**small, "tile_size": 32, "tile_stride": 16, "tile_blend": "gaussian"})
    assert tiled["pixel_aupro"] > untiled["pixel_aupro"] + 0.2, (tiled["pixel_aupro"], untiled["pixel_aupro"])
