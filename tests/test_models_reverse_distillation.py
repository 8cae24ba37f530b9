"""Reverse Distillation: the shared bottleneck/decoder components, a frozen teacher, a learning
student side, the paper's loss and maps, and bad configurations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import fit_on, normal_images

from adlib.models import TrainBatch, create_model, resolve_config
from adlib.models.components.maps import gaussian_blur2d
from adlib.models.components.reverse_distillation import (OneClassBottleneck, ResidualBottleneck, ReverseDecoder,
                                                          UpsamplingBottleneck, block_width)
from adlib.models.registry import canonical_name

BACKBONE = "resnet10t"  # layer1..3: 64 / 128 / 256 channels at strides 4 / 8 / 16
SMALL = {"backbone": BACKBONE, "bottleneck_blocks": 1, "decoder_blocks": (1, 2, 1), "width_ratio": 0.25}


def small_rd(**overrides):
    return create_model("reverse_distillation", pretrained=False, **{**SMALL, **overrides})


def test_rd_defaults_follow_the_official_code():
    assert canonical_name("rd4ad") == "reverse_distillation"
    cfg = resolve_config("rd4ad")
    assert cfg.model["backbone"] == "wide_resnet50_2" and cfg.model["layers"] == ["layer1", "layer2", "layer3"]
    assert (cfg.model["lr"], cfg.model["betas"], cfg.model["blur_sigma"]) == (0.005, [0.5, 0.999], 4.0)
    assert (cfg.model["bottleneck_blocks"], cfg.model["decoder_blocks"], cfg.model["width_ratio"]) == (3, [3, 4, 6],
                                                                                                         0.5)
    assert (cfg.train["num_epochs"], cfg.train["batch_size"], cfg.train["img_size"]) == (200, 16, 256)


def test_bottleneck_and_decoder_mirror_the_teacher_pyramid():
    channels = (8, 16, 32)
    teacher = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    bottleneck = OneClassBottleneck(channels, blocks=2, width_ratio=0.5)
    embedding = bottleneck(teacher)
    assert embedding.shape == (2, 64, 4, 4)  # 2 x the deepest channels, one stride deeper
    decoder = ReverseDecoder(channels, bottleneck.out_channels, blocks=(3, 1, 2), width_ratio=0.5)
    assert [len(stage) for stage in decoder.stages] == [3, 1, 2]  # deepest stage first
    assert [tuple(s.shape) for s in decoder(embedding)] == [tuple(t.shape) for t in teacher]
    assert block_width(2048, 0.5) == 1024 and block_width(112, 0.25) == 28 and block_width(6, 0.25) == 2
    up = UpsamplingBottleneck(16, 8, 4, stride=2)
    assert up(torch.randn(1, 16, 3, 5)).shape == (1, 4, 6, 10)
    with pytest.raises(ValueError, match="one block count per teacher layer"):
        ReverseDecoder(channels, 64, blocks=(1, 1))


def test_teacher_stays_frozen_while_bottleneck_and_decoder_learn():
    model = small_rd(lr=0.01)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    (optimizer,) = model.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]}
    assert optimizer.defaults["betas"] == (0.5, 0.999)
    report = fit_on(model, normal_images(4, 64), batch_size=4, num_epochs=3)
    assert report.loss_history[-1] < report.loss_history[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert not any(p.requires_grad for p in model.teacher.parameters()) and not model.teacher.training
    after = model.state_dict()
    changed = [k for k, v in student_before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert any(k.startswith("bottleneck.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert len(changed) > 0.9 * sum(v.is_floating_point() for v in student_before.values())
    assert set(model.saved_state()) == set(student_before)  # the frozen teacher is not saved


def test_rd_loss_and_maps_are_the_papers():
    model = small_rd().eval()
    images = normal_images(2, 64)
    teacher, student = model.features(images)
    want = sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1))).mean() for t, s in zip(teacher, student))
    torch.testing.assert_close(model.training_step(TrainBatch.of(images), None), want)
    maps = sum(F.interpolate((1 - F.cosine_similarity(t, s, dim=1))[:, None], size=(64, 64), mode="bilinear",
                             align_corners=False)[:, 0] for t, s in zip(teacher, student))
    out = model.predict(images)
    torch.testing.assert_close(out.maps, gaussian_blur2d(maps, 4.0))
    torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))


def test_rd_refuses_bad_layers_and_sizes():
    with pytest.raises(ValueError, match=r"layer 'layer7' not available; valid layers: \['act1', 'layer1'"):
        small_rd(layers=("layer1", "layer2", "layer7"))
    with pytest.raises(ValueError, match=r"twice the stride.*strides \[4, 16\]"):
        small_rd(layers=("layer1", "layer3"), decoder_blocks=(1, 1))
    with pytest.raises(ValueError, match="multiples of 32"):
        small_rd().predict(normal_images(1, 48))


def test_rd_runs_on_the_pip_backbones_channels():
    model = small_rd(backbone="tf_efficientnet_lite0")
    assert model.teacher.channels == [24, 40, 112] and model.bottleneck.out_channels == 224
    assert model.predict(normal_images(1, 64)).maps.shape == (1, 64, 64)
    assert ResidualBottleneck(8, 4, 8)(torch.randn(1, 8, 4, 4)).shape == (1, 8, 4, 4)
