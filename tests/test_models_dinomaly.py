"""Dinomaly on a tiny random-init ViT: reconstruction, hard mining, schedule, sizes, weight files, registry."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny import fit_on, normal_images, with_defect

from adlib.backbones import WeightsFileError
from adlib.models import create_model, list_models, resolve_config
from adlib.models.base import Step
from adlib.models.components.stable_adamw import StableAdamW
from adlib.models.dinomaly import hard_mined_cosine_loss
from adlib.models.registry import get_spec
from adlib.models.smoke import smoke_overrides

#: every configuration at test size: the shared tiny ViT of adlib.models.smoke
TINY = {k: v for k, v in smoke_overrides("dinomaly-base-392").items()
        if k in ("target_layers", "groups", "decoder_depth", "backbone_kwargs")}
SIZE = 56


def tiny(name: str = "dinomaly-base-392", **overrides):
    return create_model(name, pretrained=False, **{**TINY, **overrides})


def test_reconstruction_pairs_groups_of_encoder_and_decoder_maps():
    model = tiny()
    assert len(model.encoder.model.blocks) == 4 and model.encoder.num_prefix_tokens == 5  # class + 4 registers
    encoder, decoder = model.reconstruct(normal_images(2, SIZE))
    assert [tuple(m.shape) for m in encoder + decoder] == [(2, 32, 4, 4)] * 4  # prefix tokens dropped
    assert not encoder[0].requires_grad and decoder[0].requires_grad
    assert not any(p.requires_grad for p in model.encoder.parameters())
    # a 70 px image (5 x 5 patches) works too: positional embeddings are resampled
    assert model.reconstruct(normal_images(1, 70))[0][0].shape[-2:] == (5, 5)


def test_training_lowers_the_loss_and_flags_a_defect():
    torch.manual_seed(0)
    model = tiny(bottleneck_dropout=0.0, warmup_steps=2, lr=5e-3)
    report = fit_on(model, normal_images(8, SIZE), batch_size=8, num_epochs=None, max_steps=20, grad_clip_norm=0.1)
    losses = report.loss_terms["loss"]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert report.loss_terms["hard_mining_share"][-1] == pytest.approx(0.9 * 19 / 1000)
    out = model.eval().predict(torch.cat([normal_images(2, SIZE, seed=5), with_defect(normal_images(2, SIZE, seed=5))]))
    assert out.maps.shape == (4, SIZE, SIZE)
    assert out.scores[2:].min() > out.scores[:2].max()


def test_hard_mining_damps_only_the_gradient_of_easy_positions():
    torch.manual_seed(1)
    target = torch.randn(2, 8, 4, 4)
    output = torch.randn(2, 8, 4, 4, requires_grad=True)
    plain = hard_mined_cosine_loss([target], [output], p=0.0, factor=0.1)
    (plain_grad,) = torch.autograd.grad(plain, output)
    mined = hard_mined_cosine_loss([target], [output], p=0.75, factor=0.1)
    (mined_grad,) = torch.autograd.grad(mined, output)
    assert mined.item() == pytest.approx(plain.item())  # same value, other gradient
    distance = 1 - torch.nn.functional.cosine_similarity(target, output.detach(), dim=1)
    hard = distance >= distance.flatten().topk(8).values[-1]  # the 25 % hardest of 32 positions
    assert int(hard.sum()) == 8
    hard = hard.unsqueeze(1).expand_as(output)
    torch.testing.assert_close(mined_grad[hard], plain_grad[hard])
    torch.testing.assert_close(mined_grad[~hard], 0.1 * plain_grad[~hard])


def test_hard_mining_share_ramps_with_the_global_step():
    model = tiny()
    shares = [model.hard_mining_share(Step(index=i, epoch=0, total=5000)) for i in (0, 500, 1000, 4000)]
    assert shares == pytest.approx([0.0, 0.45, 0.9, 0.9])


def test_optimiser_is_stable_adamw_on_a_per_step_warm_cosine():
    model = tiny(warmup_steps=3)
    report = fit_on(model, normal_images(4, SIZE), batch_size=2, num_epochs=None, max_steps=6)
    assert report.total_steps == 6 and report.optimizer_steps == 6
    (spec,) = model.configure_optimizers()
    assert isinstance(spec.optimizer, StableAdamW) and spec.interval == "step"
    group = spec.optimizer.param_groups[0]
    assert group["amsgrad"] and group["weight_decay"] == 1e-4 and group["eps"] == 1e-8
    trainable = {id(p) for p in spec.optimizer.param_groups[0]["params"]}
    assert trainable == {id(p) for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]}
    lrs = []
    for _ in range(6):
        lrs.append(group["lr"])
        spec.optimizer.step()  # no gradients: no update
        spec.scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 1e-3, 2e-3]) and lrs[3] == pytest.approx(2e-3)
    assert 2e-4 < lrs[5] < lrs[4] < 2e-3


def test_sizes_that_are_not_multiples_of_the_patch_are_refused_with_the_fix():
    model = tiny()
    with pytest.raises(ValueError, match=r"multiples of 14; got 400x400\. Use center_crop=392 or 406"):
        model.check_input_size((400, 400))
    with pytest.raises(ValueError, match="center_crop"):
        model.predict(normal_images(1, 50))


def test_a_dinov2_file_of_the_wrong_size_names_both_sizes_and_the_fix(tmp_path):
    kwargs = {"depth": 2, "num_heads": 2}
    small = timm.create_model("vit_small_patch14_reg4_dinov2", embed_dim=32, dynamic_img_size=True, **kwargs)
    folder = tmp_path / "vit_base_patch14_reg4_dinov2"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(folder / "model.safetensors"))
    options = dict(target_layers=[0, 1], groups=[[0], [1]], decoder_depth=2,
                   backbone_kwargs={"embed_dim": 64, **kwargs})
    with pytest.raises(WeightsFileError) as info:
        create_model("dinomaly-base-392", backbone_dir=tmp_path, **options)
    text = str(info.value)
    assert "The file is a ViT with embedding width 32, 2 blocks, 4 register tokens; vit_base_patch14_reg4_dinov2 " \
           "has embedding width 64, 2 blocks, 4 register tokens" in text
    assert "small: vit_small_patch14_reg4_dinov2, width 384; base: vit_base_patch14_reg4_dinov2, width 768" in text
    assert "choose the dinomaly-<size>-<crop> configuration of the file's size" in text
    # without registers (DINOv2 of the right width, but not the -reg4 model)
    plain = timm.create_model("vit_base_patch14_dinov2", embed_dim=64, dynamic_img_size=True, **kwargs)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsFileError, match="embedding width 64, 2 blocks, 0 register tokens"):
        create_model("dinomaly-base-392", backbone_dir=tmp_path, **options)
    # the right file loads, and its provenance is kept
    good = timm.create_model("vit_base_patch14_reg4_dinov2", embed_dim=64, dynamic_img_size=True, **kwargs)
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(folder / "model.safetensors"))
    model = create_model("dinomaly-base-392", backbone_dir=tmp_path, **options)
    assert torch.equal(model.encoder.model.blocks[1].attn.qkv.weight, good.blocks[1].attn.qkv.weight)
    assert model.encoder.model.weights_provenance["source"] == str(folder / "model.safetensors")


def test_registry_holds_the_papers_nine_configurations_and_their_multiclass_variants():
    names = list_models(pattern="dinomaly-*")
    assert len(names) == 18
    for size, layers in (("small", list(range(2, 10))), ("base", list(range(2, 10))),
                         ("large", list(range(4, 19, 2)))):
        for crop, resize in ((224, 256), (392, 448), (448, 512)):
            config = resolve_config(f"dinomaly-{size}-{crop}")
            assert config.model["backbone"] == f"vit_{size}_patch14_reg4_dinov2"
            assert config.model["target_layers"] == layers and config.model["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
            assert (config.train["img_size"], config.train["center_crop"]) == (resize, crop)
            assert config.train["max_steps"] == 5000 and config.train["num_epochs"] is None
            assert config.train["grad_clip_norm"] == 0.1 and config.train["batch_size"] == 16
            assert get_spec(f"dinomaly-{size}-{crop}").scope == "category"
            multi = resolve_config(f"dinomaly-{size}-{crop}-multiclass")
            assert get_spec(multi.name).scope == "dataset" and get_spec(multi.name).family == "foundation"
            assert multi.train["max_steps"] == 10000 and multi.model["eps"] == 1e-10
            assert {k: v for k, v in multi.model.items() if k != "eps"} == \
                {k: v for k, v in config.model.items() if k != "eps"}
    import adlib.models.dinomaly as module

    assert not [n for n in vars(module) if n in ("size", "crop", "name", "backbone", "layers", "resize")]
