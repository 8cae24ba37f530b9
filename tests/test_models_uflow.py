"""U-Flow: the U-shaped flow's bookkeeping, LinearLR per optimiser step, the a-contrario NFA rule
(unit and end to end through evaluation and predict), and clear errors for sizes and layers."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binom

from adlib import Settings, train
from adlib.cli import main as cli
from adlib.data.synthetic import make_dataset
from adlib.models import FitContext, create_model
from adlib.models.components.nfa import binomial_log10_tail, log10_nfa, window_half_sides
from adlib.training import Stepper

CAIT = {"backbone_kwargs": {"img_size": 32, "depth": 2}, "vit_block": 1,
        "coarse_backbone_kwargs": {"img_size": 16, "depth": 2}, "coarse_vit_block": 1, "flow_steps": 2}


def test_u_shaped_flow_keeps_every_dimension_and_a_per_sample_log_jacobian():
    model = create_model("uflow-resnet18", pretrained=False, flow_steps=2).eval()
    feats = model.features(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    latents, log_jac = model.flow(feats)
    # coarsest stage: 256 channels, 128 go up (as 32 at 8x8); middle: 128 + 32 = 160, 80 go up (20 at 16x16)
    assert [tuple(z.shape[1:]) for z in latents] == [(84, 16, 16), (80, 8, 8), (128, 4, 4)]
    assert sum(z[0].numel() for z in latents) == sum(f[0].numel() for f in feats)  # invertible: no loss
    assert log_jac.shape == (2,)


def test_linear_lr_decays_to_its_end_factor_over_the_fit_per_optimiser_step():
    model = create_model("uflow-resnet18", pretrained=False, flow_steps=2)
    model.setup_fit(FitContext(device=torch.device("cpu"), total_steps=5))
    [spec] = model.configure_optimizers()
    assert spec.interval == "step"
    stepper, rates = Stepper([spec]), []
    weight = next(model.flow.parameters())
    for _ in range(5):
        rates.append(spec.optimizer.param_groups[0]["lr"] / model.lr)
        stepper.step(weight.square().sum())
    assert rates == pytest.approx([1.0, 0.85, 0.7, 0.55, 0.4])


def test_binomial_tail_table_and_windows():
    table = binomial_log10_tail(49, 0.5)
    for n, k in ((49, 30), (9, 9), (9, 1), (25, 12)):
        assert float(table[n, k]) == pytest.approx(math.log10(binom.sf(k - 1, n, 0.5)))  # P(X >= k)
    assert float(table[9, 0]) == pytest.approx(0.0) and table[3, 4] == -math.inf
    assert window_half_sides(7, 3) == [3, 1, 1]


def test_nfa_detects_a_block_of_large_latents_and_nothing_on_normal_ones():
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(6, 16, 12, 12, generator=g), torch.randn(6, 8, 6, 6, generator=g)]
    assert float(log10_nfa(latents).min()) > 0  # no false detection on standard normal latents
    latents[0][0, :, 3:9, 3:9] *= 5  # image 0: a 6x6 block of large values at the finest scale
    nfa = log10_nfa(latents)
    assert float(nfa[0].min()) < 0 and float(nfa[1:].min()) > 0
    row, col = divmod(int(nfa[0].argmin()), 12)
    assert 3 <= row < 9 and 3 <= col < 9


def test_bad_sizes_and_layers_are_refused_with_what_to_use():
    model = create_model("uflow", pretrained=False, **CAIT)
    with pytest.raises(ValueError, match=r"multiples of 32; got 48x48"):
        model.predict(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"expects 32x32 inputs but got 64x64: train with img_size=32"):
        model.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"built for 16 px .* built for 32 px: set coarse_backbone_kwargs"):
        create_model("uflow", pretrained=False, **{**CAIT, "coarse_backbone_kwargs": {"img_size": 32, "depth": 2}})
    with pytest.raises(ValueError, match=r"halve .*strides \[4, 16\]: choose consecutive layers"):
        create_model("uflow-resnet18", pretrained=False, layers=["layer1", "layer3"])
    with pytest.raises(ValueError, match=r"nfa_probability must be in \(0, 1\) \(default 0.5\); got 1.5"):
        create_model("uflow-resnet18", pretrained=False, nfa_probability=1.5)
    with pytest.raises(ValueError, match="either a transformer `vit_block`"):
        create_model("uflow", pretrained=False, layers=["layer1"])
    with pytest.raises(ValueError, match="not a transformer with blocks: .*a CNN configuration with layers"):
        create_model("uflow", pretrained=False, backbone="tf_efficientnet_lite0")  # a CNN with `blocks`


@pytest.fixture(scope="module")
def uflow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset("mvtec", root / "mvtec", categories=("widget",), n_train=8, n_test_good=4, n_test_bad=4,
                 size=64, seed=0)
    out = tmp_path_factory.mktemp("out")
    settings = Settings(data_root=root, output_dir=out, backbone_dir=out / "no-weights", device="cpu", seed=0)
    [result] = train("mvtec", "widget", "uflow-resnet18", settings=settings, pretrained=False, progress=False,
                     img_size=64, batch_size=4, max_steps=2, flow_steps=2)
    return out / "mvtec" / "widget" / "uflow-resnet18", result, root


def test_evaluation_reports_the_nfa_rule_beside_the_fitted_thresholds(uflow_run):
    run, result, _ = uflow_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["thresholds"]) == {"f1_percentile", "f1_uniform", "roc_youden", "percentile_95", "nfa"}
    nfa = metrics["thresholds"]["nfa"]
    assert nfa["threshold"] == 0.0 and nfa["tp"] + nfa["fn"] + nfa["tn"] + nfa["fp"] == metrics["n_test"]
    assert result["thresholds"]["nfa"] == nfa
    text = (run / "results_mvtec_widget_uflow-resnet18_thresholds.txt").read_text()
    assert "A-contrario (NFA <= 1): 0.000 | F1:" in text


def test_predict_decides_by_the_nfa_rule(uflow_run, tmp_path):
    run, _, root = uflow_run
    images = sorted((root / "mvtec" / "widget" / "test").rglob("*.png"))[:3]
    out = tmp_path / "scores.csv"
    cli(["predict", str(run), *map(str, images), "--out", str(out), "--threshold-method", "nfa",
         "--backbone-dir", str(tmp_path), "--device", "cpu"])
    table = pd.read_csv(out)
    assert list(table.columns[:3]) == ["image_path", "score", "decision"]
    np.testing.assert_array_equal(table["anomalous"], table["decision"] >= 0)
    assert (table["threshold_method"] == "nfa").all()
