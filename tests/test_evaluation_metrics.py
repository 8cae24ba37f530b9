"""Image-level metrics against scikit-learn (random data with ties) and on one-class input."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from adlib.evaluation import average_precision, f1_max, image_auroc, image_metrics
from adlib.evaluation.metrics import binary_curve


def _sklearn_f1_max(y, s):
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return f1.max()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [3, 17, 400])
def test_matches_sklearn_with_ties(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[-1] = 0, 1  # both classes present
    # few distinct values -> many ties, some of them across classes
    s = np.round(rng.normal(size=n) + 0.7 * y, 1)
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert f1_max(y, s) == pytest.approx(_sklearn_f1_max(y, s), abs=1e-12)


def test_all_scores_tied():
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 0.3)
    assert image_auroc(y, s) == pytest.approx(0.5)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    assert f1_max(y, s) == pytest.approx(2 * 3 / (2 * 3 + 2 + 0))  # everything flagged


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_single_class_gives_none_and_reason(labels):
    scores = np.linspace(0, 1, len(labels))
    assert image_auroc(labels, scores) is None
    assert average_precision(labels, scores) is None
    assert f1_max(labels, scores) is None
    out = image_metrics(labels, scores)
    assert out["image_auroc"] is None and out["n_test"] == len(labels)
    assert any(note.startswith("image_auroc: ") for note in out["notes"])


def test_image_metrics_counts_and_torch_input():
    torch = pytest.importorskip("torch")
    y = torch.tensor([0, 0, 1, 1, 1])
    s = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.9], dtype=torch.float16)
    out = image_metrics(y, s)
    assert (out["n_test"], out["n_normal"], out["n_anomalous"]) == (5, 2, 3)
    assert out["image_auroc"] == pytest.approx(5 / 6)
    assert out["notes"] == []


def test_binary_curve_counts():
    curve = binary_curve([0, 1, 1, 0], [0.2, 0.9, 0.2, 0.5])
    assert curve.thresholds.tolist() == [0.9, 0.5, 0.2]
    assert curve.tps.tolist() == [1, 1, 2]
    assert curve.fps.tolist() == [0, 1, 2]


@pytest.mark.parametrize("labels,scores,message", [
    ([0, 1, 2], [0.1, 0.2, 0.3], "labels must be 0"),
    ([0, 1], [0.1, np.nan], "NaN or infinite"),
    ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
    ([[0, 1]], [[0.1, 0.2]], "must be 1-D"),
])
def test_bad_input_raises_clear_error(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)
