"""CFlow through the one loop on tiny images: batch-independent scores, fiber-batch stepping,
the warm-up + cosine schedule, and clear errors."""
from __future__ import annotations

import math

import pytest
import torch
from tiny import fit_on, normal_images, with_defect

from adlib.models import create_model
from adlib.models.cflow import fiber_batches, positional_encoding_2d
from adlib.training import NonFiniteLossError

SMALL = {"coupling_blocks": 2, "fiber_batch_size": 64}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = create_model("cflow-resnet18", pretrained=False, **SMALL)
    report = fit_on(model, normal_images(6, 64), batch_size=3, num_epochs=None, max_steps=2)
    return model.eval(), report


def test_score_of_an_image_does_not_depend_on_the_other_images_of_its_batch(trained):
    model, _ = trained
    image = with_defect(normal_images(1, 64, seed=5), seed=2)
    with_normals = model.predict(torch.cat([image, normal_images(2, 64, seed=6)]))
    with_defects = model.predict(torch.cat([image, with_defect(normal_images(3, 64, seed=7), seed=3)]))
    alone = model.predict(image)
    # the other images really differ (a batch-wide normalisation would move every score)
    assert not torch.allclose(with_normals.scores[1:], with_defects.scores[1:3], atol=1e-3)
    for other in (with_defects, alone):
        torch.testing.assert_close(other.scores[0], with_normals.scores[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other.maps[0], with_normals.maps[0], rtol=1e-5, atol=1e-5)


def test_map_normalisation_comes_from_the_training_images(trained):
    model, report = trained
    assert report.passes["likelihood_max"] == 6  # one pass over the training images after training
    # the stored maximum is the largest per-dimension log-likelihood of each layer on those images
    images = normal_images(6, 64)
    with torch.no_grad():
        expected = torch.stack([model.log_likelihood(layer, fibers, cond).max()
                                for layer, (fibers, cond, _) in enumerate(model.fibers(images))])
    torch.testing.assert_close(model.likelihood_max, expected, rtol=1e-5, atol=1e-5)
    # a normal training image's map is near 0 at its most likely positions and never far below
    maps = model.predict(images).maps
    assert float(maps.min()) > -0.5 and float(maps.max()) <= len(model.layers)


def test_many_optimiser_steps_per_image_batch(trained):
    model, report = trained
    # 3 images at 64 px: layer2 8x8 -> 192 fibers = 3 batches of 64; layer3 4x4 -> 48 < 64: one
    # batch; layer4 2x2 -> 12: one batch
    assert model._steps_per_batch == 3 + 1 + 1
    assert report.optimizer_steps == 2 * model._steps_per_batch and report.steps == 2
    order = torch.arange(10)
    assert [len(b) for b in fiber_batches(order, 4)] == [4, 4]  # remainder dropped (reshuffled each batch)
    assert [len(b) for b in fiber_batches(order, 16)] == [10]


def test_warmup_then_cosine_schedule():
    model = create_model("cflow-resnet18", pretrained=False, **SMALL)
    lr = model.lr_factor
    assert lr(0.0) == pytest.approx(0.1)
    assert lr(0.04) == pytest.approx(0.1 + 0.5 * (lr(0.08) - 0.1))  # linear warm-up ...
    assert lr(0.08 - 1e-9) == pytest.approx(lr(0.08))  # ... into the cosine without a jump
    assert lr(0.5) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert lr(1.0) == pytest.approx(1e-3)
    assert max(lr(p / 100) for p in range(101)) <= 1.0


def test_positional_encoding_is_sin_cos_of_column_then_row():
    enc = positional_encoding_2d(8, 3, 5)
    assert enc.shape == (8, 3, 5)
    torch.testing.assert_close(enc[0], torch.sin(torch.arange(5.0)).expand(3, 5))  # first column frequency
    torch.testing.assert_close(enc[5], torch.cos(torch.arange(3.0))[:, None].expand(3, 5))  # first row cosine
    assert torch.allclose(enc[:4, 0], enc[:4, 2]) and not torch.allclose(enc[4:, 0], enc[4:, 2])


def test_bad_input_errors_name_the_value_and_what_to_use():
    with pytest.raises(ValueError, match=r"layer 'layer5' not available; valid layers: .*layer4"):
        create_model("cflow-resnet18", pretrained=False, layers=["layer2", "layer5"])
    with pytest.raises(ValueError, match="multiple of 4.*got 130"):
        create_model("cflow-resnet18", pretrained=False, condition_dims=130)
    model = create_model("cflow-resnet18", pretrained=False, **SMALL)
    with torch.no_grad():
        next(model.flows[1].parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match=r"CFlow layer3: the log-likelihood is nan .*lr=2e-05"):
        model.eval().predict(normal_images(1, 64))
