"""DFKDE and DFM (one-pass feature models) through the one loop on tiny synthetic images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import fit_on, normal_images, with_defect

from adlib.models import create_model


def trained(name: str, images: torch.Tensor, steps: int = 1, **overrides):
    """The registered configuration ``name`` at test size, trained through the one loop."""
    model = create_model(name, pretrained=False, **{**SMALL.get(name, {}), **overrides})
    report = fit_on(model, images, batch_size=len(images) if model.learns_by == "gradient" else 4,
                    num_epochs=None, max_steps=steps)
    return model, report.loss_terms.get("loss", [])


SMALL = {"dfm": {"pooling_kernel_size": 2}}


def test_dfkde_is_image_level_and_ranks_defects_higher():
    model, _ = trained("dfkde", normal_images(12, 64))
    assert model.produces_maps is False
    good, bad = normal_images(4, 64, seed=5), with_defect(normal_images(4, 64, seed=5))
    s_good, s_bad = model.predict(good).scores, model.predict(bad).scores
    assert model.predict(good).maps is None
    assert float(s_bad.min()) > float(s_good.max())
    assert model.pca.num_components == 11  # 16 requested, capped by the 12 training images


def test_dfkde_needs_training_images():
    model = create_model("dfkde", pretrained=False)
    with pytest.raises(RuntimeError, match="no training images"):
        model.finalize()
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(normal_images(1, 64))


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_dfm_scores_and_maps_localise_defects(score_type):
    model, _ = trained("dfm", normal_images(12, 64), score_type=score_type)
    good = normal_images(4, 64, seed=5)
    bad = good.clone()
    bad[:, :, :32, :32] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # defect in the top-left quarter
    out_good, out_bad = model.predict(good), model.predict(bad)
    assert float(out_bad.scores.min()) > float(out_good.scores.max())
    top_left = out_bad.maps[:, :32, :32].mean()
    bottom_right = out_bad.maps[:, 32:, 32:].mean()
    assert float(top_left) > float(bottom_right)


def test_dfm_rejects_a_pooling_kernel_larger_than_the_feature_map():
    model = create_model("dfm", pretrained=False)
    with pytest.raises(ValueError, match="pooling_kernel_size=4"):
        fit_on(model, normal_images(1, 32))  # layer3 of 32 px images is 2x2


