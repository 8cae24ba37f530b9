"""Aggregates from per-run files: leaderboard, ranks, statistics, cost view, thresholds, report page."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fake_runs import make_grid, make_run
from sklearn.metrics import roc_auc_score

from adlib.reporting.cost import cost_table, pareto_front, write_cost_view
from adlib.reporting.leaderboard import build_leaderboard, category_ranks, summarize_models, write_leaderboard
from adlib.reporting.runs import RunFileError, run_identity
from adlib.reporting.stats import (bootstrap_auroc, friedman_test, mean_ranks, nemenyi_critical_difference,
                                   not_different_groups, rank_matrix, write_statistics)
from adlib.reporting.summary import write_summary_report
from adlib.reporting.thresholds_summary import threshold_table, transfer_gap, write_threshold_analysis

MODELS = {"good": 3.0, "mid": 1.5, "weak": 0.5}


@pytest.fixture()
def grid(tmp_path):
    return make_grid(tmp_path / "runs", MODELS, categories=("a", "b", "c", "d"), seeds=(0, 1))


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- leaderboard
def test_leaderboard_has_one_row_per_run_with_the_run_files_values(grid):
    board = build_leaderboard(grid)
    assert len(board) == len(grid) == 4 * 3 * 2
    row = board[(board.category == "b") & (board.model == "mid") & (board.seed == 1)].iloc[0]
    metrics = json.loads((grid[0].parents[3] / "ds/b/mid/1/metrics.json").read_text())
    assert row.image_auroc == pytest.approx(metrics["image_auroc"])
    assert row.thr_f1_percentile_f1 == pytest.approx(metrics["thresholds"]["f1_percentile"]["f1"])
    assert row.fit_seconds == 1.0 and row.inference_ms_batch == 5.0 and row.num_parameters == 1000
    assert row.backbone == "tf_efficientnet_lite0" and row.family == "memory" and row.img_size == 32
    for column in ("dataset", "category", "model", "seed", "image_aupr", "image_f1_max", "pixel_auroc",
                   "pixel_aupro", "peak_rss_mb", "peak_cuda_mb", "device", "git_commit", "config_hash",
                   "torch_version", "epochs_run"):
        assert column in board.columns


def test_run_identity_and_missing_file_error(tmp_path):
    assert run_identity("results/runs/mvtec/bottle/padim/3") == {"dataset": "mvtec", "category": "bottle",
                                                                "model": "padim", "seed": 3}
    run = make_run(tmp_path, "ds", "a", "m", 0)
    (run / "fit.json").unlink()
    with pytest.raises(RunFileError, match="fit.json is missing"):
        build_leaderboard([run])


def test_ranks_and_summary(grid):
    board = build_leaderboard(grid)
    ranks = category_ranks(board, "image_auroc")
    assert len(ranks) == 4 * 3  # seeds averaged per block
    seed_mean = board[(board.category == "a") & (board.model == "good")].image_auroc.mean()
    assert ranks[(ranks.category == "a") & (ranks.model == "good")].image_auroc.iloc[0] == pytest.approx(seed_mean)
    summary = summarize_models(board, ranks)
    assert list(summary.model) == ["good", "mid", "weak"]
    assert summary.mean_rank.iloc[0] < summary.mean_rank.iloc[-1]
    good = board[board.model == "good"].image_auroc
    assert summary.image_auroc_mean.iloc[0] == pytest.approx(good.mean())
    assert summary.image_auroc_std.iloc[0] == pytest.approx(good.std(ddof=1))
    assert summary.n_runs.iloc[0] == 8 and summary.n_categories.iloc[0] == 4


def test_same_named_categories_of_two_data_sets_count_twice(tmp_path):
    runs = [make_run(tmp_path, dataset, "bottle", "good", 0) for dataset in ("mvtec", "mine")]
    summary = summarize_models(build_leaderboard(runs))
    assert summary.n_categories.iloc[0] == 2


def test_ranks_share_ties_and_skip_missing_metrics():
    board = pd.DataFrame({"dataset": "d", "category": "c", "model": ["x", "y", "z"], "seed": 0,
                          "image_auroc": [0.9, 0.9, np.nan]})
    ranks = category_ranks(board)
    assert sorted(ranks["rank"]) == [1.5, 1.5] and set(ranks.model) == {"x", "y"}


def test_write_leaderboard_files_and_recomputation_is_identical(grid, tmp_path):
    out = tmp_path / "agg"
    paths = [out / n for n in ("lb.csv", "lb.parquet", "summary.csv", "ranks.csv")]
    write_leaderboard(grid, *paths)
    first = [p.read_bytes() for p in paths if p.suffix == ".csv"]
    parquet = pd.read_parquet(paths[1])
    assert len(parquet) == len(grid) and parquet.image_auroc.dtype == float
    write_leaderboard(grid, *paths)
    assert [p.read_bytes() for p in paths if p.suffix == ".csv"] == first


# ---------------------------------------------------------------------------------------------- statistics
def test_friedman_matches_scipy_and_guards_small_inputs():
    from scipy.stats import friedmanchisquare

    rng = np.random.default_rng(0)
    values = pd.DataFrame(rng.uniform(0.5, 1, (6, 4)), columns=list("abcd"))
    result = friedman_test(values)
    stat, p = friedmanchisquare(*[values[c] for c in values])
    assert result["statistic"] == pytest.approx(stat) and result["p_value"] == pytest.approx(p)
    assert friedman_test(values[["a", "b"]])["statistic"] is None
    assert "at least 3 models" in friedman_test(values[["a", "b"]])["note"]
    assert friedman_test(values.iloc[:1])["statistic"] is None


@pytest.mark.parametrize(("k", "q"), [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (10, 3.164)])
def test_nemenyi_critical_difference_matches_demsar_table(k, q):
    n = 14
    assert nemenyi_critical_difference(k, n, 0.05) == pytest.approx(q * np.sqrt(k * (k + 1) / (6 * n)), abs=2e-3)


def test_not_different_groups():
    ranks = pd.Series({"a": 1.0, "b": 1.4, "c": 2.6, "d": 3.0})
    assert not_different_groups(ranks, 0.5) == [["a", "b"], ["c", "d"]]
    assert not_different_groups(ranks, 5.0) == [["a", "b", "c", "d"]]
    assert not_different_groups(ranks, 0.1) == []


def test_bootstrap_auroc_point_estimate_interval_and_determinism():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(40, int), np.ones(30, int)]
    scores = rng.normal(0, 1, 70) + 1.2 * labels
    scores[:5] = scores[45:50]  # ties across classes
    result = bootstrap_auroc(labels, scores, n_boot=500, seed=3)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["ci_low"] < result["auroc"] < result["ci_high"]
    assert bootstrap_auroc(labels, scores, n_boot=500, seed=3) == result
    wide = bootstrap_auroc(labels[::3], scores[::3], n_boot=500, seed=3)
    assert wide["ci_high"] - wide["ci_low"] > result["ci_high"] - result["ci_low"]
    single = bootstrap_auroc(np.zeros(5), np.arange(5.0))
    assert single["auroc"] is None and "normal and anomalous" in single["note"]


def test_write_statistics(grid, tmp_path):
    out = tmp_path / "agg"
    write_leaderboard(grid, out / "lb.csv", out / "lb.parquet", out / "s.csv", out / "r.csv")
    result = write_statistics(out / "lb.parquet", grid, out / "stats.json", out / "cd.png", out / "ci.csv",
                              n_boot=200)
    saved = json.loads((out / "stats.json").read_text())
    assert saved["friedman"]["n_models"] == 3 and saved["friedman"]["n_blocks"] == 4
    assert saved["friedman"]["p_value"] is not None and result["critical_difference"] > 0
    assert list(saved["mean_ranks"]) == ["good", "mid", "weak"]
    assert _png(out / "cd.png")
    ci = pd.read_csv(out / "ci.csv")
    assert len(ci) == len(grid) and (ci.ci_low <= ci.auroc).all() and (ci.auroc <= ci.ci_high).all()


def test_statistics_with_two_models_has_no_friedman_but_a_diagram(tmp_path):
    runs = make_grid(tmp_path / "runs", {"x": 2.0, "y": 1.0}, categories=("a", "b"))
    out = tmp_path / "agg"
    write_leaderboard(runs, out / "lb.csv", out / "lb.parquet", out / "s.csv", out / "r.csv")
    result = write_statistics(out / "lb.parquet", runs, out / "stats.json", out / "cd.png", out / "ci.csv",
                              n_boot=100)
    assert result["friedman"]["statistic"] is None and _png(out / "cd.png")


def test_rank_matrix_drops_incomplete_blocks(grid):
    board = build_leaderboard(grid)
    board.loc[(board.category == "a") & (board.model == "weak"), "image_auroc"] = np.nan
    values = rank_matrix(category_ranks(board), "image_auroc")
    assert list(values.index.get_level_values("category")) == ["b", "c", "d"]
    assert list(mean_ranks(values).index) == ["good", "mid", "weak"]
    board["pixel_aupro"] = np.where(board.model == "weak", np.nan, 0.5)  # an image-level model
    values = rank_matrix(category_ranks(board, "pixel_aupro"), "pixel_aupro")
    assert list(values.columns) == ["good", "mid"] and len(values) == 4


# ---------------------------------------------------------------------------------------------- cost
def test_pareto_front():
    cost = np.array([1.0, 2.0, 3.0, 2.5, np.nan])
    value = np.array([0.7, 0.9, 0.95, 0.85, 0.99])
    assert pareto_front(cost, value).tolist() == [True, True, True, False, False]


def test_cost_view(tmp_path):
    runs = [make_run(tmp_path / "runs", "ds", "a", "fast", 0, separation=1.0, ms=1.0, fit_seconds=1.0),
            make_run(tmp_path / "runs", "ds", "a", "slow", 0, separation=3.0, ms=10.0, fit_seconds=20.0),
            make_run(tmp_path / "runs", "ds", "a", "bad", 0, separation=0.5, ms=20.0, fit_seconds=30.0)]
    out = tmp_path / "agg"
    write_leaderboard(runs, out / "lb.csv", out / "lb.parquet", out / "s.csv", out / "r.csv")
    table = write_cost_view(out / "lb.parquet", out / "cost.csv", out / "cost.png")
    front = dict(zip(table.model, table.pareto_inference_ms_batch))
    assert front == {"bad": False, "fast": True, "slow": True}
    assert _png(out / "cost.png") and len(pd.read_csv(out / "cost.csv")) == 3
    assert cost_table(build_leaderboard(runs)).pareto_fit_seconds.sum() == 2


# ---------------------------------------------------------------------------------------------- thresholds
def test_threshold_table_oracle_only_without_calibration(grid):
    table = threshold_table(grid)
    assert len(table) == len(grid) * 4 and set(table.kind) == {"oracle"}
    assert transfer_gap(table).empty


def test_threshold_analysis_with_calibration(tmp_path):
    runs = make_grid(tmp_path / "runs", MODELS, categories=("a", "b"), calibration=True)
    out = tmp_path / "agg"
    table = write_threshold_analysis(runs, out / "t.csv", out / "t.parquet", out / "t.md")
    assert len(table) == len(runs) * 4 * 2 and set(table.kind) == {"oracle", "transferred"}
    gap = transfer_gap(table).set_index("method")
    sub = table[table.method == "percentile_95"].pivot_table(index=["category", "model"], columns="kind",
                                                             values="f1")
    assert gap.loc["percentile_95", "f1_gap"] == pytest.approx((sub.transferred - sub.oracle).mean())
    text = (out / "t.md").read_text()
    assert "Oracle vs transferred" in text and "f1_percentile" in text and "Best method per model" in text
    assert len(pd.read_parquet(out / "t.parquet")) == len(table)


def test_threshold_notes_for_runs_without_anomalies(tmp_path):
    run = make_run(tmp_path / "runs", "ds", "a", "m", 0, n_anomalous=0)
    table = threshold_table([run])
    f1 = table[table.method == "f1_percentile"].iloc[0]
    assert not f1.available and f1.note
    assert table[table.method == "percentile_95"].iloc[0].available


# ---------------------------------------------------------------------------------------------- summary page
def test_summary_report_page(grid, tmp_path):
    from adlib.ensemble.report import write_ensemble_report

    out = tmp_path / "agg"
    write_leaderboard(grid, out / "lb.csv", out / "lb.parquet", out / "s.csv", out / "r.csv")
    write_statistics(out / "lb.parquet", grid, out / "stats.json", out / "cd.png", out / "ci.csv", n_boot=100)
    write_cost_view(out / "lb.parquet", out / "cost.csv", out / "cost.png")
    write_threshold_analysis(grid, out / "t.csv", out / "t.parquet", out / "t.md")
    write_ensemble_report(grid, tmp_path / "ens", top_k=3, n_boot=100)
    page = write_summary_report(tmp_path / "index.html", summary_csv=out / "s.csv", statistics_json=out / "stats.json",
                                cd_png=out / "cd.png", cost_png=out / "cost.png", thresholds_md=out / "t.md",
                                ensemble_md=tmp_path / "ens" / "ensemble.md")
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "Friedman test over 4 categories" in html and "<table>" in html and "Recommended" in html
