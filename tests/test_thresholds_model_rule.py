"""A model's own unsupervised decision rule (U-Flow's a-contrario ``nfa``) beside the four fitted
thresholds: metrics.json rows, the results text and the threshold analysis across runs."""
import json

import numpy as np
import pytest
from fake_runs import make_run

from adlib.evaluation import build_metrics, format_results_txt, threshold_report
from adlib.reporting.thresholds_summary import method_summary, threshold_markdown, threshold_table


def _data():
    labels = np.r_[np.zeros(6, int), np.ones(4, int)]
    scores = np.r_[np.linspace(0, 1, 6), np.linspace(0.8, 2, 4)]
    # the rule's own statistic: >= 0 flags the image (here two normal and three anomalous images)
    decision = np.array([-3.0, -1, -0.5, -0.1, 0.0, 0.2, -2, 0.5, 1.5, 4.0])
    return labels, scores, decision


def test_rule_row_is_the_confusion_matrix_of_decision_at_zero_in_both_tables():
    labels, scores, decision = _data()
    report = threshold_report(labels, scores, labels, scores, decision=decision, decision_method="nfa")
    for key in ("thresholds", "transferred_thresholds"):
        row = report[key]["nfa"]
        assert (row["threshold"], row["tp"], row["fn"], row["tn"], row["fp"]) == (0.0, 3, 1, 4, 2)
        assert row["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
        assert set(report[key]) == {"f1_percentile", "f1_uniform", "roc_youden", "percentile_95", "nfa"}
    plain = threshold_report(labels, scores)
    assert "nfa" not in plain["thresholds"]  # models without a rule have no row
    with pytest.raises(ValueError, match="both decision and decision_method"):
        threshold_report(labels, scores, decision=decision)
    with pytest.raises(ValueError, match="unknown model decision rule 'mine'.*nfa"):
        threshold_report(labels, scores, decision=decision, decision_method="mine")
    with pytest.raises(ValueError, match="NaN"):
        threshold_report(labels, scores, decision=np.full(10, np.nan), decision_method="nfa")


def test_results_text_lists_the_rule_only_when_the_model_has_one():
    labels, scores, decision = _data()
    with_rule = format_results_txt(build_metrics(labels, scores, decision=decision, decision_method="nfa"))
    line = next(x for x in with_rule.splitlines() if x.startswith("A-contrario (NFA <= 1)"))
    assert line == "A-contrario (NFA <= 1): 0.000 | F1: 0.667, Sensitivity: 0.750, Specificity: 0.667"
    assert "A-contrario" not in format_results_txt(build_metrics(labels, scores))


def test_threshold_analysis_has_rule_rows_only_for_runs_that_report_it(tmp_path):
    labels, scores, decision = _data()
    plain = make_run(tmp_path / "runs", "ds", "a", "padim", 0, calibration=True)
    uflow = make_run(tmp_path / "runs", "ds", "a", "uflow", 0, calibration=True)
    metrics_path = uflow / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    rule = threshold_report(labels, scores, labels, scores, decision=decision, decision_method="nfa")
    for key in ("thresholds", "transferred_thresholds"):
        metrics[key]["nfa"] = rule[key]["nfa"]
    metrics_path.write_text(json.dumps(metrics))

    table = threshold_table([plain, uflow])
    nfa = table[table.method == "nfa"]
    assert set(nfa.model) == {"uflow"} and set(nfa.kind) == {"oracle", "transferred"}
    assert nfa.available.all() and (nfa.threshold == 0.0).all() and (nfa.tp == 3).all()
    assert len(table) == 2 * 2 * 4 + 2
    summary = method_summary(table)
    assert list(summary.method)[-2:] == ["nfa", "nfa"]
    assert "a-contrario rule" in threshold_markdown(table)
    assert "a-contrario" not in threshold_markdown(threshold_table([plain]))
