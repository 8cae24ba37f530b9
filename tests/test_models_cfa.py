"""CFA: the memory bank from the pass before training, the coupled-hypersphere loss, k-means
compression, and the pip EfficientNet-Lite0 / MobileNetV2 weights as backbones."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import fit_on, normal_images, with_defect

from adlib.models.base import TrainBatch
from adlib.models.registry import create_model
from adlib.training import seed_everything


def tiny_cfa(**overrides):
    seed_everything(0)
    return create_model("cfa", pretrained=False, backbone="resnet18", center_crop=None, **overrides)


def test_memory_is_the_per_position_mean_of_the_initial_descriptor():
    model = tiny_cfa()
    untrained = copy.deepcopy(model).eval()
    images = normal_images(6, 64)
    fit_on(model, images, batch_size=4, max_steps=2)
    with torch.no_grad():
        expected = untrained.describe(images).mean(dim=0).flatten(1).T  # [h * w, D]
    torch.testing.assert_close(model.memory, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.descriptor.conv.weight, untrained.descriptor.conv.weight)  # then adapted


def test_loss_pulls_nearest_and_pushes_hard_negatives():
    model = tiny_cfa(num_nearest=2, num_hard_negatives=3, radius=0.5, margin=0.1, nu=0.01)
    model.memory = torch.randn(20, model.memory.shape[1])
    images = normal_images(2, 64)
    out = model.training_step(TrainBatch.of(images), step=None)
    with torch.no_grad():
        phi = model.describe(images)
    rows = phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1])
    d = torch.cdist(rows, model.memory).square().sort(dim=1).values
    attract = F.relu(d[:, :2] - 0.25).mean() / 0.01
    repel = F.relu(0.25 - d[:, 2:5] - 0.1).mean() / 0.01
    torch.testing.assert_close(out["attract"], attract, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["repel"], repel, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"].detach(), attract + repel, rtol=1e-4, atol=1e-4)


def test_gamma_c_compresses_the_memory_with_kmeans():
    model = tiny_cfa(gamma_c=4)
    fit_on(model, normal_images(4, 64), batch_size=4, max_steps=1)
    assert model.memory.shape[0] == (16 * 16) // 4  # layer1 grid of a 64 px image, a quarter of it
    out = model.predict(torch.cat([normal_images(1, 64, seed=7), with_defect(normal_images(1, 64, seed=7))]))
    assert out.maps.shape == (2, 64, 64) and torch.isfinite(out.scores).all()


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "mobilenetv2_100"])
def test_runs_on_the_pip_weights(backbone):
    seed_everything(0)
    model = create_model("cfa", backbone=backbone, center_crop=None)
    assert model.extractor.weights_provenance["source"].startswith("pip:")
    fit_on(model, normal_images(4, 64), batch_size=4, max_steps=1)
    scores = model.predict(torch.cat([normal_images(1, 64, seed=7), with_defect(normal_images(1, 64, seed=7))])).scores
    assert torch.isfinite(scores).all()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="gamma_d"):
        tiny_cfa(gamma_d=0)
    with pytest.raises(ValueError, match="num_hard_negatives"):
        tiny_cfa(num_hard_negatives=-1)
