"""Choosing an ensemble on per-run files (fake runs): the calibration split decides everything,
test labels cannot change the choice, the report compares with the best single model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fake_runs import make_grid, make_run
from sklearn.metrics import roc_auc_score

from adlib.ensemble.diversity import diversity_rows
from adlib.ensemble.fitted import fit_ensemble
from adlib.ensemble.report import OUTPUTS, blocks_of, read_runs, write_ensemble_report
from adlib.ensemble.runs import CALIBRATION, TEST
from adlib.evaluation.thresholds import fit_threshold

#: three equally good models with independent noise (fusing them helps) and a weak one
MODELS = {"p": 1.2, "q": 1.2, "r": 1.2, "weak": 0.2}


def _grid(tmp_path, **kwargs):
    options = {"categories": ("c1", "c2"), "calibration": True, "n_normal": 48, "n_anomalous": 48, **kwargs}
    return make_grid(tmp_path / "runs", MODELS, **options)


def _permute_test_labels(run_dirs, seed=0):
    """Shuffle the test labels of every run (the same shuffle for every model of a category)."""
    for run_dir in run_dirs:
        path = run_dir / "scores.parquet"
        frame = pd.read_parquet(path)
        test = frame.index[frame.split == "test"]
        order = np.random.default_rng([seed, len(test)]).permutation(len(test))
        frame.loc[test, "label"] = frame.loc[test, "label"].to_numpy()[order]
        frame.to_parquet(path, index=False)


def test_block_fits_on_calibration_normals_and_its_thresholds(tmp_path):
    runs = _grid(tmp_path, categories=("c1",))
    frame, _ = read_runs(runs)
    [block] = blocks_of(frame)
    assert block.fit_split == CALIBRATION and len(block.test) == 96 and len(block.fit) == 24
    ensemble = fit_ensemble(block, ["p", "q"], "zscore", "mean")
    scores = pd.read_parquet(runs[0].parent.parent / "p" / "0" / "scores.parquet")
    normals = scores[(scores.split == "calibration") & (scores.label == 0)].score.to_numpy(float)
    assert ensemble.score_normalizers["p"].params == pytest.approx({"mean": normals.mean(), "std": normals.std()})
    fused = ensemble.fuse_scores(block.fit.raw)
    assert ensemble.thresholds["f1_percentile"] == fit_threshold("f1_percentile", block.fit.label, fused).threshold
    weighted = fit_ensemble(block, ["p", "q", "weak"], "rank", "weighted")
    assert set(weighted.weights) == {"p", "q", "weak"} and min(weighted.weights.values()) >= 0
    assert weighted.weights["weak"] < weighted.weights["p"]


def test_test_labels_cannot_change_the_chosen_ensemble(tmp_path):
    runs = _grid(tmp_path)
    first = write_ensemble_report(runs, tmp_path / "a", top_k=3, n_boot=100)
    frame, _ = read_runs(runs)
    fitted = [fit_ensemble(b, first["members"], first["normalization"], first["fusion"]).to_dict()
              for b in blocks_of(frame)]
    _permute_test_labels(runs)
    second = write_ensemble_report(runs, tmp_path / "b", top_k=3, n_boot=100)
    assert second == first  # candidates, subset, rule, best singles: the calibration split alone decides
    frame, _ = read_runs(runs)
    assert [fit_ensemble(b, first["members"], first["normalization"], first["fusion"]).to_dict()
            for b in blocks_of(frame)] == fitted  # statistics, weights, thresholds
    for name in ("candidates.csv", "weights.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / name), pd.read_csv(tmp_path / "b" / name))
    a, b = (pd.read_csv(tmp_path / d / "fusion_results.csv") for d in "ab")
    pd.testing.assert_series_equal(a.fit_image_auroc, b.fit_image_auroc)
    assert not np.allclose(a.test_image_auroc, b.test_image_auroc)  # the test labels did change


def test_report_recommends_fusion_of_complementary_models_and_compares_with_the_best_single(tmp_path):
    runs = _grid(tmp_path, seeds=(0, 1))
    out = tmp_path / "ens"
    rec = write_ensemble_report(runs, out, top_k=3, n_boot=200)
    assert "weak" not in rec["members"] and len(rec["members"]) >= 2 and rec["ensemble_helps_on_fit_split"]
    assert set(rec["fit_splits"].values()) == {CALIBRATION}
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert json.loads((out / "recommendation.json").read_text()) == rec
    summary = pd.read_csv(out / "fusion_summary.csv")
    assert summary.recommended.sum() == 1 and set(summary["size"]) == {1, 2, 3}
    results = pd.read_csv(out / "fusion_results.csv")
    # 2 categories x 2 seeds; per block: 4 singles + (3 pairs + 1 triple) x 3 normalisations x 3 fusions
    assert len(results) == 4 * (4 + 4 * 3 * 3)
    comparison = pd.read_csv(out / "comparison.csv")
    assert len(comparison) == 4 + 1 and comparison.category.iloc[-1] == "mean over blocks"
    blocks = comparison.iloc[:-1]
    assert (blocks.ci_low <= blocks.difference).all() and (blocks.difference <= blocks.ci_high).all()
    scores = pd.read_parquet(out / "recommended_scores.parquet")
    row = blocks.iloc[0]
    test = scores[(scores.category == row.category) & (scores.seed == row.seed) & (scores.split == TEST)]
    assert row.ensemble_auroc == pytest.approx(roc_auc_score(test.label, test.ensemble_score))
    assert row.best_single_auroc == pytest.approx(roc_auc_score(test.label, test.best_single_score))
    assert (pd.read_csv(out / "weights.csv").weight >= 0).all()
    text = (out / "ensemble.md").read_text()
    assert "calibration split" in text and "paired bootstrap" in text and "selection is optimistic" not in text
    assert "data:image/png;base64," in (out / "ensemble.html").read_text()


def test_without_calibration_the_report_says_selection_is_optimistic(tmp_path):
    runs = make_grid(tmp_path / "runs", {"p": 1.5, "q": 1.0, "r": 0.5}, categories=("c1", "c2"))
    rec = write_ensemble_report(runs, tmp_path / "ens", top_k=3, normalizations=["zscore"], fusions=["max"],
                                n_boot=100)
    assert set(rec["fit_splits"].values()) == {TEST}
    text = (tmp_path / "ens" / "ensemble.md").read_text()
    assert "selection is optimistic" in text and "test split" in text


def test_diversity_counts_shared_failures_on_the_fit_split(tmp_path):
    runs = _grid(tmp_path, categories=("c1",))
    frame, _ = read_runs(runs)
    [block] = blocks_of(frame)
    [row] = [r for r in diversity_rows(block, ["p", "q"])]
    p, q, y = block.fit.raw["p"], block.fit.raw["q"], block.fit.label
    assert row["spearman"] == pytest.approx(pd.Series(p).corr(pd.Series(q), method="spearman"))
    wrong = {m: (s >= fit_threshold("f1_percentile", y, s).threshold) != (y == 1) for m, s in (("p", p), ("q", q))}
    both = wrong["p"] & wrong["q"]
    assert row["joint_failures"] == both.sum() and row["joint_failure_rate"] == pytest.approx(both.mean())
    assert row["failure_overlap"] == pytest.approx(both.sum() / (wrong["p"] | wrong["q"]).sum())


def test_single_model_and_bad_settings(tmp_path):
    runs = [make_run(tmp_path / "runs", "ds", "c1", "only", 0, calibration=True)]
    rec = write_ensemble_report(runs, tmp_path / "ens", n_boot=100)
    assert rec["members"] is None and "nothing to fuse" in (tmp_path / "ens" / "ensemble.md").read_text()
    with pytest.raises(ValueError, match="unknown fusion 'median'"):
        write_ensemble_report(runs, tmp_path / "ens", fusions=["median"])
    with pytest.raises(ValueError, match="unknown normalisation"):
        write_ensemble_report(runs, tmp_path / "ens", normalizations=["l2"])
    with pytest.raises(ValueError, match="unknown selection metric 'pixel_aupro'"):
        write_ensemble_report(runs, tmp_path / "ens", metric="pixel_aupro")
