"""SuperSimpleNet: features, feature-space anomalies, heads and their gradients, optimiser groups,
pip backbones, and the supervised configuration's labelled training split (end to end)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tiny import fit_on, normal_images

from adlib import Settings
from adlib.data import DataError, load_manifest
from adlib.data.synthetic import make_dataset
from adlib.models import create_model
from adlib.models.base import TrainBatch
from adlib.models.components.focal_loss import binary_focal_loss, focal_loss
from adlib.models.supersimplenet import SuperSimpleNet
from adlib.reporting.leaderboard import leaderboard_row
from adlib.run import evaluate_run, prepare_data, train_run

SMALL = {"backbone": "resnet18", "seg_hidden": 16, "cls_hidden": 8}


def small(name: str = "supersimplenet", **overrides) -> SuperSimpleNet:
    return create_model(name, pretrained=False, **{**SMALL, **overrides})


def test_features_are_twice_layer2_resolution_with_both_layers_channels():
    model = small()
    feats = model.features(normal_images(2, 64))
    assert feats.shape == (2, 128 + 256, 16, 16)  # ResNet-18 layer2 (stride 8) + layer3, at 2x 8 x 8
    out = model.eval().predict(normal_images(2, 64))
    assert out.maps.shape == (2, 64, 64) and ((out.scores > 0) & (out.scores < 1)).all()
    assert ((out.maps >= 0) & (out.maps <= 1)).all()


def test_synthetic_anomalies_stay_inside_perlin_masks_and_outside_known_defects():
    model = small()
    raw = torch.randn(4, 6, 16, 16)
    adapted = torch.randn(4, 6, 16, 16)
    mask = torch.zeros(4, 1, 16, 16)
    mask[0, :, :8] = 1.0  # image 0 is a labelled anomaly: its upper half is already defective
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    noisy_raw, noisy, new_mask, new_labels = model.synthesise(raw, adapted, mask, labels)
    assert noisy.shape == (8, 6, 16, 16) and new_mask.shape == (8, 1, 16, 16)
    changed = (noisy != torch.cat([adapted, adapted])).any(dim=1, keepdim=True)
    assert not (changed & (torch.cat([mask, mask]) > 0)).any()  # no noise on the known defect
    assert (new_mask[changed] == 1).all() and (new_mask[torch.cat([mask, mask]) > 0] == 1).all()
    torch.testing.assert_close(noisy_raw - torch.cat([raw, raw]), noisy - torch.cat([adapted, adapted]))  # same noise
    assert torch.equal(new_labels, (new_mask.flatten(1).amax(1) > 0).float())
    assert new_labels[0] == 1 and new_labels[4] == 1
    # noise of the paper's scale, only where the mask is set
    assert (noisy - torch.cat([adapted, adapted]))[changed.expand_as(noisy)].std() == pytest.approx(0.015, rel=0.2)


def test_perlin_masks_are_seeded_binary_and_half_empty():
    model = small(perlin_threshold=0.2)
    masks = model.perlin_masks(200, (12, 20), torch.device("cpu"))
    assert masks.shape == (200, 1, 12, 20) and set(masks.unique().tolist()) <= {0.0, 1.0}
    empty = (masks.flatten(1).amax(1) == 0).float().mean()
    assert 0.4 < empty < 0.7  # half are empty by design, a few more have no noise above the threshold
    again = small(perlin_threshold=0.2).perlin_masks(200, (12, 20), torch.device("cpu"))
    assert torch.equal(masks, again)
    higher = small(perlin_threshold=0.6).perlin_masks(200, (12, 20), torch.device("cpu"))
    assert higher.mean() < masks.mean()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        small(perlin_threshold=1.5)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_keeps_the_classification_loss_out_of_the_segmentation_head(stop_grad):
    model = small(stop_grad=stop_grad).train()
    raw = model.features(normal_images(2, 64))
    _, image_logits = model.heads(raw, model.adaptor(raw))
    image_logits.sum().backward()
    seg_grad = sum(float(p.grad.abs().sum()) for p in model.head.seg.parameters() if p.grad is not None)
    assert (seg_grad == 0.0) == stop_grad


def test_two_learning_rate_groups_and_epoch_milestones():
    model = small()
    report = fit_on(model, normal_images(2, 64), batch_size=2, num_epochs=10)
    assert set(report.loss_terms) == {"loss", "map_focal", "map_l1", "image_focal"}
    (spec,) = model.configure_optimizers()
    adaptor, heads = spec.optimizer.param_groups
    assert (adaptor["lr"], adaptor["weight_decay"]) == (1e-4, 1e-2)
    assert (heads["lr"], heads["weight_decay"]) == (2e-4, 1e-5)
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.head.parameters()}
    assert spec.interval == "epoch" and sorted(spec.scheduler.milestones) == [8, 9]


def test_binary_focal_loss_is_the_two_class_softmax_focal_loss():
    logits = torch.randn(3, 1, 5, 5)
    target = (torch.rand(3, 1, 5, 5) > 0.5).float()
    two_class = torch.cat([torch.zeros_like(logits), logits], dim=1)  # softmax of [0, x] = sigmoid(x)
    torch.testing.assert_close(binary_focal_loss(logits, target, 4.0), focal_loss(two_class, target, gamma=4.0))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(binary_focal_loss(logits, target, 0.0), bce)


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "mobilenetv2_100"])
def test_runs_with_the_pip_backbones(backbone):
    model = create_model("supersimplenet", backbone=backbone, seg_hidden=16, cls_hidden=8)
    assert model.extractor.weights_provenance["source"].startswith("pip:")
    fit_on(model, normal_images(2, 64), batch_size=2, max_steps=1)
    assert model.eval().predict(normal_images(1, 64)).maps.shape == (1, 64, 64)


# ----- the supervised configuration, end to end ------------------------------------------------
FAST = {**SMALL, "img_size": 64, "batch_size": 4, "num_epochs": 2}


def _settings(root, out):
    return Settings(data_root=root, output_dir=out, backbone_dir=out / "no-weights", device="cpu", seed=0)


def test_supervised_training_uses_labelled_anomalies_it_never_evaluates(tmp_path, monkeypatch):
    make_dataset("mvtec", tmp_path / "mvtec", categories=("widget",), n_train=4, n_test_good=3, n_test_bad=8,
                 size=64, seed=0)
    cfg = {"name": "mvtec", "layout": "mvtec", "root": str(tmp_path / "mvtec")}
    manifest_path = prepare_data(cfg, "widget", 64, tmp_path / "m.parquet", tmp_path / "cache")
    seen: list[TrainBatch] = []
    original = SuperSimpleNet.training_step
    monkeypatch.setattr(SuperSimpleNet, "training_step",
                        lambda self, batch, step, stepper=None: seen.append(batch) or original(self, batch, step))
    settings = _settings(tmp_path, tmp_path)
    run = train_run(manifest_path, "supersimplenet-supervised", FAST, tmp_path / "sup", settings, pretrained=False,
                    progress=False)
    evaluate_run(run, manifest_path, settings, progress=False)

    trained_on = set(json.loads((run / "splits.json").read_text())["labelled_train"])
    manifest = load_manifest(manifest_path)
    anomalous = manifest[(manifest.split == "test") & (manifest.label == 1)]
    assert len(trained_on) == 4 and trained_on <= set(anomalous.image_path)  # half of each of the defect types
    scored = set(pd.read_parquet(run / "scores.parquet").image_path)
    assert not scored & trained_on and len(scored) == 3 + 8 - 4
    epoch_one = seen[: len(seen) // 2]
    assert sum(int(b.labels.sum()) for b in epoch_one) == 4  # 4 normal + 4 labelled: each once per epoch ...
    assert all(b.masks[b.labels == 1].flatten(1).amax(1).eq(1).all() for b in epoch_one)  # ... with its mask
    assert all(b.masks[b.labels == 0].sum() == 0 for b in epoch_one)
    assert leaderboard_row(run)["supervision"] == "supervised"
    assert json.loads((run / "fit.json").read_text())["num_labelled_train_images"] == 4

    unsupervised = train_run(manifest_path, "supersimplenet", {**FAST, "num_epochs": 1}, tmp_path / "unsup",
                             settings, pretrained=False, progress=False)
    evaluate_run(unsupervised, manifest_path, settings, progress=False)
    assert leaderboard_row(unsupervised)["supervision"] == "unsupervised"
    assert len(pd.read_parquet(unsupervised / "scores.parquet")) == 3 + 8


def test_supervised_without_anomalies_to_move_names_the_unsupervised_configuration(tmp_path):
    make_dataset("mvtec", tmp_path / "mv", categories=("one",), n_train=4, n_test_good=2, n_test_bad=1, size=32)
    cfg = {"name": "mv", "layout": "mvtec", "root": str(tmp_path / "mv")}
    manifest = prepare_data(cfg, "one", 32, tmp_path / "m.parquet", tmp_path / "cache")
    with pytest.raises(DataError) as info:
        train_run(manifest, "supersimplenet-supervised", {**FAST, "img_size": 32}, tmp_path / "run",
                  _settings(tmp_path, tmp_path), pretrained=False, progress=False)
    text = str(info.value)
    assert "supersimplenet-supervised trains on labelled anomalous images" in text
    assert "no anomalous test image that can move to training (each defect type needs at least 2" in text
    assert "Use the unsupervised configuration supersimplenet, or add anomalous images" in text
    assert not (tmp_path / "run").exists()
