"""GANomaly: generator then discriminator stepped by the loop on their own losses, the fixed
score scale from held-out normal images, image sizes that are not powers of two."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import fit_on, normal_images, with_defect

from adlib.models.base import FitContext, Step, TrainBatch
from adlib.models.registry import create_model
from adlib.training import seed_everything

TINY = {"n_features": 4, "latent_dim": 8}


def tiny_ganomaly(img_size: int = 32, **overrides):
    seed_everything(0)
    return create_model("ganomaly", img_size=img_size, **{**TINY, **overrides})


def test_loop_steps_generator_then_discriminator_each_on_its_loss():
    model = tiny_ganomaly()
    images, validation = normal_images(4, 32), normal_images(4, 32, seed=5)
    expected = copy.deepcopy(model)
    fit_on(model, images, batch_size=4, max_steps=1, validation=validation)

    # the same step by hand: G on g_loss (graph kept), then D on d_loss
    expected.setup_fit(FitContext(device=torch.device("cpu"), total_steps=1))
    g_spec, d_spec = expected.configure_optimizers()
    assert (g_spec.loss, d_spec.loss) == ("g_loss", "d_loss")
    g_params = {id(p) for group in g_spec.optimizer.param_groups for p in group["params"]}
    d_params = {id(p) for group in d_spec.optimizer.param_groups for p in group["params"]}
    assert d_params == {id(p) for p in expected.discriminator.parameters()}
    assert g_params.isdisjoint(d_params) and g_params | d_params == {id(p) for p in expected.parameters()}
    expected.train()
    out = expected.training_step(TrainBatch.of(images), Step(0, 0, 1))
    g_spec.optimizer.zero_grad()
    out["g_loss"].backward(retain_graph=True)
    g_spec.optimizer.step()
    d_spec.optimizer.zero_grad()
    out["d_loss"].backward()
    d_spec.optimizer.step()

    trained, by_hand = dict(model.named_parameters()), dict(expected.named_parameters())
    start = dict(tiny_ganomaly().named_parameters())
    for name, value in trained.items():
        assert not torch.equal(value, start[name]), f"{name} was not updated"
        torch.testing.assert_close(value, by_hand[name], rtol=1e-5, atol=1e-6)


def test_scores_are_scaled_by_validation_images_only():
    model = tiny_ganomaly()
    validation = normal_images(4, 32, seed=5)
    fit_on(model, normal_images(8, 32), batch_size=4, max_steps=2, validation=validation)
    model.eval()
    with torch.no_grad():
        expected_scale = model.latent_distance(validation).median()
    torch.testing.assert_close(model.score_scale, expected_scale)
    test = torch.cat([normal_images(2, 32, seed=9), with_defect(normal_images(1, 32, seed=9))])
    alone = torch.cat([model.predict(test[i:i + 1]).scores for i in range(3)])
    torch.testing.assert_close(model.predict(test).scores, alone)  # no statistics of the evaluated batch
    assert model.predict(test).maps is None


def test_needs_held_out_images():
    with pytest.raises(ValueError, match="validation_fraction"):
        fit_on(tiny_ganomaly(), normal_images(4, 32), batch_size=4, max_steps=1)


def test_pads_sizes_that_are_not_powers_of_two_and_refuses_other_inputs():
    model = tiny_ganomaly(img_size=40)
    assert model.side == 64
    fit_on(model, normal_images(4, 40), batch_size=4, max_steps=1, validation=normal_images(4, 40, seed=5))
    assert model.predict(normal_images(2, 40)).scores.shape == (2,)
    with pytest.raises(ValueError, match="built for 40x40"):
        model.predict(normal_images(1, 32))
    with pytest.raises(ValueError, match="at least 16"):
        tiny_ganomaly(img_size=8)


def test_resets_the_discriminator_when_it_wins():
    model = tiny_ganomaly(d_reset_threshold=1e9)  # every loss counts as "won"
    report = fit_on(model, normal_images(4, 32), batch_size=4, num_epochs=3,
                    validation=normal_images(4, 32, seed=5))
    assert report.loss_terms["d_reset"] == [0.0, 1.0, 1.0]  # the first step has no previous loss
    assert model.provenance()["ganomaly_discriminator_resets"] == 2
