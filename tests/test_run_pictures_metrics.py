"""What an evaluation reports and draws: metrics per defect type (metrics.json, the per-defect
leaderboard) and overlays a person can read, on one colour scale per run, with examples of every
defect type and the worst errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adlib.data.synthetic import make_dataset
from adlib.evaluation.metrics import image_auroc
from adlib.evaluation.overlay import MIN_PANEL
from adlib.reporting.leaderboard import build_defect_table
from adlib.run import evaluate_run, prepare_data, train_run
from adlib.run.loaders import CPU_SCORING_BATCH, scoring_batch_size
from adlib.run.pictures import choose_overlays, overlay_scale
from adlib.settings import Settings


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pics")
    make_dataset("mvtec", root / "mv", categories=("widget",), n_train=8, n_test_good=4, n_test_bad=8, size=48)
    manifest = prepare_data({"name": "mv", "layout": "mvtec", "root": str(root / "mv")}, "widget", 48,
                            root / "m.parquet", root / "cache")
    settings = Settings(data_root=root, output_dir=root, device="cpu", seed=0)
    run_dir = root / "run"
    train_run(manifest, "padim", {"img_size": 48, "backbone": "resnet18", "n_features": 30}, run_dir, settings,
              cache_root=root / "cache", pretrained=False, progress=False)
    evaluate_run(run_dir, manifest, settings, cache_root=root / "cache", progress=False)
    return run_dir


def test_metrics_per_defect_type_are_reported(run):
    metrics = json.loads((run / "metrics.json").read_text())
    scores = pd.read_parquet(run / "scores.parquet")
    types = sorted(set(scores.loc[scores.label == 1, "defect_type"]))
    assert sorted(metrics["per_defect_type"]) == types and len(types) >= 2
    for name in types:
        subset = scores[(scores.label == 0) | (scores.defect_type == name)]
        entry = metrics["per_defect_type"][name]
        assert entry["image_auroc"] == pytest.approx(image_auroc(subset.label, subset.score))
        assert entry["n"] == int((scores.defect_type == name).sum())
        assert 0 <= entry["pixel_auroc"] <= 1 and 0 <= entry["pixel_aupro"] <= 1
    table = build_defect_table([run])
    assert sorted(table.defect_type) == types and table.image_auroc.notna().all()


def test_scoring_batches_change_memory_not_results(run, tmp_path):
    """The CPU scores 16 test images at a time whatever the training batch (32 here); another
    scoring batch gives the same scores and metrics."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["batch_size"] == CPU_SCORING_BATCH < json.loads((run / "config.json").read_text())["train"]["batch_size"]
    root = run.parent
    settings = Settings(data_root=root, output_dir=root, device="cpu", seed=0, scoring_batch_size=5)
    again = tmp_path / "again"
    evaluate_run(again, root / "m.parquet", settings, cache_root=root / "cache", progress=False, model_dir=run)
    other = json.loads((again / "metrics.json").read_text())
    assert other["batch_size"] == 5
    np.testing.assert_allclose(pd.read_parquet(again / "scores.parquet").score, pd.read_parquet(run / "scores.parquet").score,
                               rtol=1e-5)
    assert other["image_auroc"] == metrics["image_auroc"]
    for key in ("pixel_auroc", "pixel_aupro"):  # the first batch sets the histograms' grid: binning differs
        assert other[key] == pytest.approx(metrics[key], abs=2e-4), key
    # accelerators score in the configuration's batches; an explicit setting wins everywhere
    assert scoring_batch_size({"batch_size": 32}, Settings(), torch.device("cuda")) == 32
    assert scoring_batch_size({"batch_size": 4}, Settings(), torch.device("cpu")) == 4
    assert scoring_batch_size({"batch_size": 32}, Settings(scoring_batch_size=16), torch.device("cuda")) == 16


def test_overlays_show_every_defect_type_at_a_readable_size(run):
    names = sorted(p.name for p in (run / "overlays").glob("*.png"))
    scores = pd.read_parquet(run / "scores.parquet")
    for name in set(scores.loc[scores.label == 1, "defect_type"]):
        assert any(f"_defect-{name}_" in n for n in names), name
    sizes = {Image.open(run / "overlays" / n).size for n in names}
    assert len(sizes) == 1 and min(sizes.pop()) >= MIN_PANEL


def test_the_choice_of_overlays_covers_types_and_the_worst_errors():
    frame = pd.DataFrame({"label": [0, 0, 0, 0, 1, 1, 1, 1, 1],
                          "defect_type": ["good"] * 4 + ["scratch", "scratch", "dent", "dent", "hole"]})
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.95, 0.3, 0.6, 0.2, 0.7])
    picks = dict(choose_overlays(frame, scores, threshold=0.5))
    assert {picks[i] for i in (4, 5)} == {"defect-scratch"} and picks[8] == "defect-hole"
    assert picks[1] == "false-positive" and picks[2] == "false-positive"  # normals above 0.5, worst first
    assert {i for i, k in picks.items() if k.startswith("defect-") or k == "false-negative"} >= {5, 7}
    assert len(picks) == len(set(picks))


def test_one_colour_scale_puts_the_normal_pixel_threshold_in_the_middle():
    reference = np.random.default_rng(0).normal(1.0, 0.1, (6, 8, 8)).astype(np.float16)
    low, threshold, high = overlay_scale(reference)
    assert low < threshold < high and threshold - low == pytest.approx(high - threshold)
    assert threshold == pytest.approx(np.quantile(reference.astype(np.float32), 0.995))
