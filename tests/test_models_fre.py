"""FRE: the derived autoencoder size, bad combinations, and reconstruction-error scores."""
from __future__ import annotations

import pytest
import torch
from tiny import fit_on, normal_images, with_defect

from adlib.backbones import FeatureExtractor
from adlib.models import create_model, resolve_config
from adlib.models.fre import pooled_feature_shape

BACKBONE = "resnet10t"  # layer2: 128 channels at stride 8, layer3: 256 at stride 16


def small_fre(**overrides):
    return create_model("fre", backbone=BACKBONE, pretrained=False, **{"latent_dim": 16, **overrides})


def test_fre_defaults_follow_the_reference():
    cfg = resolve_config("fre")
    assert (cfg.model["backbone"], cfg.model["layer"], cfg.model["pooling_kernel_size"]) == ("resnet50", "layer3", 2)
    assert (cfg.model["latent_dim"], cfg.model["lr"]) == (220, 1e-3)
    assert (cfg.train["num_epochs"], cfg.train["batch_size"], cfg.train["img_size"]) == (220, 32, 256)


@pytest.mark.parametrize("layer, size, pooling, shape", [
    ("layer3", 64, 2, (256, 2, 2)),  # 64 / 16 = 4, pooled by 2
    ("layer3", 96, 2, (256, 3, 3)),
    ("layer3", 96, 1, (256, 6, 6)),
    ("layer2", 64, 2, (128, 4, 4)),
    ("layer2", 72, 2, (128, 4, 4)),  # 9 x 9 map, floor of 9 / 2
])
def test_fre_input_dimension_is_derived_from_backbone_layer_size_and_pooling(layer, size, pooling, shape):
    extractor = FeatureExtractor(BACKBONE, [layer], pretrained=False)
    assert pooled_feature_shape(extractor, size, pooling) == shape


def test_fre_builds_and_saves_its_autoencoder_at_the_training_size():
    model = small_fre()
    fit_on(model, normal_images(4, 96), batch_size=4, max_steps=1)
    assert tuple(model.autoencoder.weight.shape) == (16, 256 * 3 * 3)
    state = model.saved_state()
    assert state["feature_shape"].tolist() == [256, 3, 3]
    fresh = small_fre()
    fresh.load_saved_state(state)
    images = normal_images(2, 96, seed=3)
    torch.testing.assert_close(fresh.eval().predict(images).scores, model.eval().predict(images).scores, rtol=0,
                               atol=0)
    with pytest.raises(ValueError, match="training image size"):
        model.predict(normal_images(1, 64))


def test_fre_refuses_impossible_combinations_before_training():
    with pytest.raises(ValueError, match=r"pooling_kernel_size=8 does not fit the 4x4 feature map"):
        fit_on(small_fre(pooling_kernel_size=8), normal_images(4, 64), max_steps=1)
    with pytest.raises(ValueError, match=r"latent_dim=2000 must be smaller than the input dimension 1024"):
        fit_on(small_fre(latent_dim=2000), normal_images(4, 64), max_steps=1)
    with pytest.raises(ValueError, match=r"layer 'layer9' not available; valid layers: .*layer3"):
        small_fre(layer="layer9")
    with pytest.raises(RuntimeError, match="not trained"):
        small_fre().predict(normal_images(1, 64))


def test_fre_learns_the_normal_features_and_scores_the_summed_error():
    model = small_fre()
    report = fit_on(model, normal_images(8, 64), batch_size=8, num_epochs=15)
    assert report.loss_history[-1] < 0.5 * report.loss_history[0]
    images = torch.cat([normal_images(2, 64, seed=5), with_defect(normal_images(2, 64, seed=5))])
    out = model.eval().predict(images)
    assert out.maps.shape == (4, 64, 64) and (out.maps >= 0).all()
    feats = model.features(images)
    error = (feats - model.autoencoder(feats)).square().sum(dim=1)
    torch.testing.assert_close(out.scores, error)  # score: summed error of the low-resolution map
    assert out.scores[2:].min() > out.scores[:2].max()
