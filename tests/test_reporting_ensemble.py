"""Ensemble-candidate report: candidates, normalisation, fusion, correlation, recommendation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fake_runs import make_grid, make_run
from sklearn.metrics import roc_auc_score

from adlib.reporting.ensemble import (CALIBRATION_SOURCE, TEST_SOURCE, block_matrix, fuse, fusion_results,
                                      normalize, select_candidates, write_ensemble_report)
from adlib.reporting.leaderboard import build_leaderboard, write_leaderboard
from adlib.reporting.runs import read_all_scores

MODELS = {"a1": 2.5, "a2": 2.2, "a3": 2.0, "a4": 0.8}


def _leaderboard(runs, tmp_path):
    out = tmp_path / "agg"
    write_leaderboard(runs, out / "lb.csv", out / "lb.parquet", out / "s.csv", out / "r.csv")
    return out / "lb.parquet"


def test_normalisations_use_the_reference_normals():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    scores = np.array([2.5, 10.0, 1.0])
    z = normalize(scores, reference, "zscore")
    assert z == pytest.approx((scores - 2.5) / np.std(reference))
    assert normalize(scores, reference, "minmax") == pytest.approx([0.5, 3.0, 0.0])
    assert normalize(scores, reference, "rank") == pytest.approx([2 / 3, 1.0, 1 / 3])
    assert np.isfinite(normalize(scores, np.ones(3), "zscore")).all()  # constant reference: no division by 0
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(scores, reference, "softmax")


def test_fusion():
    matrix = np.array([[0.0, 1.0], [2.0, 4.0]])
    assert fuse(matrix, "mean").tolist() == [0.5, 3.0]
    assert fuse(matrix, "max").tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(matrix, "median")


def test_candidates_by_mean_rank(tmp_path):
    runs = make_grid(tmp_path / "runs", MODELS, categories=("c1", "c2", "c3"))
    table = select_candidates(build_leaderboard(runs), top_k=3)
    assert table.mean_rank.is_monotonic_increasing and table.position.tolist() == [1, 2, 3, 4]
    assert table.model.iloc[-1] == "a4" and table.candidate.tolist() == [True, True, True, False]


def test_reference_comes_from_calibration_normals_when_present(tmp_path):
    with_cal = [make_run(tmp_path / "r1", "ds", "c", m, 0, calibration=True) for m in ("x", "y")]
    scores = read_all_scores(with_cal)
    wide, reference, source = block_matrix(scores, ["x", "y"])
    assert source == CALIBRATION_SOURCE
    calib = scores[(scores.split == "calibration") & (scores.label == 0) & (scores.model == "x")]
    assert sorted(reference["x"]) == pytest.approx(sorted(calib.score))
    assert len(wide) == 40 and set(wide.columns) == {"x", "y", "label"}

    without = [make_run(tmp_path / "r2", "ds", "c", m, 0) for m in ("x", "y")]
    wide, reference, source = block_matrix(read_all_scores(without), ["x", "y"])
    assert source == TEST_SOURCE and len(reference["x"]) == 20


def test_fusion_results_single_rows_match_run_auroc_and_fusion_is_correct(tmp_path):
    runs = make_grid(tmp_path / "runs", {"x": 1.0, "y": 1.0}, categories=("c",), calibration=True)
    scores = read_all_scores(runs)
    results, corr = fusion_results(scores, ["x", "y"], ["zscore"], ["mean"])
    assert len(results) == 3  # x, y, x+y
    test = scores[scores.split == "test"]
    x = test[test.model == "x"].set_index("image_path")
    y = test[test.model == "y"].set_index("image_path").reindex(x.index)
    single = results[results.members == "x"].image_auroc.iloc[0]
    assert single == pytest.approx(roc_auc_score(x.label, x.score))
    ref = lambda frame, m: frame[(frame.model == m) & (frame.split == "calibration") & (frame.label == 0)].score  # noqa: E731
    fused = ((x.score - ref(scores, "x").mean()) / ref(scores, "x").std(ddof=0)
             + (y.score - ref(scores, "y").mean()) / ref(scores, "y").std(ddof=0)) / 2
    pair = results[results.members == "x+y"].iloc[0]
    assert pair.image_auroc == pytest.approx(roc_auc_score(x.label, fused))
    assert pair.norm_source == CALIBRATION_SOURCE
    assert corr.spearman.iloc[0] == pytest.approx(pd.Series(x.score.values).corr(pd.Series(y.score.values),
                                                                                  method="spearman"))


def test_write_ensemble_report_recommends_fusion_of_complementary_models(tmp_path):
    # equally good models with independent noise: averaging them must help
    runs = make_grid(tmp_path / "runs", {"p": 1.2, "q": 1.2, "r": 1.2, "weak": 0.2},
                     categories=("c1", "c2", "c3", "c4"), seeds=(0, 1), calibration=True, n_normal=60,
                     n_anomalous=60)
    out = tmp_path / "ens"
    rec = write_ensemble_report(_leaderboard(runs, tmp_path), runs, out, top_k=3)
    assert rec["ensemble_helps"] and "+" in rec["members"]
    assert rec["mean_auroc"] > rec["best_single_auroc"]
    for name in ("candidates.csv", "correlation.csv", "correlation.png", "fusion_results.csv",
                 "fusion_summary.csv", "ensemble.md", "ensemble.html"):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "fusion_summary.csv")
    assert summary.recommended.sum() == 1
    assert set(summary["size"]) == {1, 2, 3}
    results = pd.read_csv(out / "fusion_results.csv")
    # 4 categories x 2 seeds; per block: 3 singles + (3 pairs + 1 triple) x 3 normalisations x 2 fusions
    assert len(results) == 8 * (3 + 4 * 3 * 2)
    assert "weak" not in set(results.members.str.split("+").sum())
    html = (out / "ensemble.html").read_text()
    assert "data:image/png;base64," in html and "Recommended" in html
    assert "calibration normals" in (out / "ensemble.md").read_text()


def test_report_warns_when_normals_come_from_the_test_split(tmp_path):
    runs = make_grid(tmp_path / "runs", {"p": 1.5, "q": 1.0, "r": 0.5}, categories=("c1", "c2"))
    out = tmp_path / "ens"
    write_ensemble_report(_leaderboard(runs, tmp_path), runs, out, top_k=3, normalizations=["zscore"],
                          fusions=["max"])
    assert "optimistic" in (out / "ensemble.md").read_text()


def test_single_model_and_bad_settings(tmp_path):
    runs = make_grid(tmp_path / "runs", {"only": 1.5}, categories=("c1",))
    out = tmp_path / "ens"
    lb = _leaderboard(runs, tmp_path)
    rec = write_ensemble_report(lb, runs, out, top_k=3)
    assert not rec["ensemble_helps"] and rec["members"] == "only"
    assert "nothing to fuse" in (out / "ensemble.md").read_text()
    with pytest.raises(ValueError, match="unknown fusion"):
        write_ensemble_report(lb, runs, out, fusions=["median"])
