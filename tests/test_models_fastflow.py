"""FastFlow (CNN and ViT feature paths) through the one loop on tiny synthetic images."""
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


SMALL = {"fastflow": {"flow_steps": 2, "hidden_ratio": 0.25}}


def test_fastflow_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    _, losses = trained("fastflow-resnet18", normal_images(2, 32), steps=4)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert losses == sorted(losses, reverse=True)


def test_fastflow_vit_path_takes_tokens_of_the_chosen_block():
    model = create_model("fastflow-deit", pretrained=False, backbone_kwargs={"img_size": 32, "depth": 3},
                         vit_block=1)
    assert len(model.extractor.model.blocks) == 2  # pruned after block 1
    feats = model.features(normal_images(1, 32))
    assert [tuple(f.shape) for f in feats] == [(1, 768, 2, 2)]  # class + distillation tokens dropped
    with pytest.raises(ValueError, match="img_size"):
        model.predict(normal_images(1, 64))
    with pytest.raises(ValueError, match="out of range"):
        create_model("fastflow-cait", pretrained=False, backbone_kwargs={"img_size": 32, "depth": 2})
    with pytest.raises(ValueError, match="not both"):
        create_model("fastflow-deit", pretrained=False, layers=("layer1",))


