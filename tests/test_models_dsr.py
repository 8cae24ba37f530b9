"""DSR: its two phases, latent-space anomalies, and its general appearance model as a file
(trained with `adlib backbones train-dsr-vq`, the authors' layout, and bad files)."""
from __future__ import annotations

import pytest
import torch
from tiny import fit_on, normal_images, with_defect, write_images

from adlib.backbones import MissingWeightsError, WeightsFileError
from adlib.backbones.cli import main as backbones_main
from adlib.models.components.vq import GeneralAppearanceModel, from_reference_layout
from adlib.models.dsr import replace_with_distant_codes
from adlib.models.registry import create_model
from adlib.training import seed_everything

#: a general appearance model small enough to train in a test
TINY_GENERAL = {"num_embeddings": 16, "embedding_dim": 8, "hidden": 8, "residual_hidden": 4, "residual_layers": 1}
TINY = {**TINY_GENERAL, "restriction_width": 4, "detector_width": 4, "decoder_bottleneck": 4}
PHASE_MODULES = {"restriction": ("restrict_hi", "restrict_lo", "object_decoder", "detector"),
                 "upsampling": ("upsampler",)}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_modules(before: dict, after: dict) -> set[str]:
    return {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}


def test_each_phase_trains_only_its_modules():
    seed_everything(0)
    model = create_model("dsr", pretrained=False, **TINY)
    states = [snapshot(model)]
    model.on_epoch_end = lambda epoch: states.append(snapshot(model))  # one step per epoch below
    report = fit_on(model, normal_images(2, 64), batch_size=2, num_epochs=3)
    # 3 steps: round(3 * 0.7) = 2 restriction steps, then 1 upsampling step
    assert report.steps == 3 and len(states) == 4
    for before, after in zip(states[:2], states[1:3]):
        assert changed_modules(before, after) == set(PHASE_MODULES["restriction"])
    assert changed_modules(states[2], states[3]) == set(PHASE_MODULES["upsampling"])
    assert {"restriction_loss", "upsampling_loss", "focal", "image", "features"} <= set(report.loss_terms)


def test_latent_anomalies_replace_masked_codes_by_distant_ones():
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(40, 4, generator=gen)
    z = torch.randn(2, 4, 3, 3, generator=gen)
    q = torch.randn(2, 4, 3, 3, generator=gen)
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, :2, :2] = 1
    out = replace_with_distant_codes(z, q, codebook, mask, torch.tensor([0.2, 0.2]), gen, skip_fraction=0.05)
    inside = mask[:, 0].bool()
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[~inside], q.permute(0, 2, 3, 1)[~inside])
    # strength 0.2 of 40 codes: ranks 2 .. 8 by distance to z (the nearest 5 % = 2 are skipped)
    for y, x in inside[0].nonzero().tolist():
        ranks = torch.cdist(z[0, :, y, x][None], codebook)[0].argsort()
        chosen = (codebook == out[0, :, y, x]).all(dim=1).nonzero().item()
        assert chosen in ranks[2:9].tolist()


def test_predicts_maps_and_scores_and_labels_random_init_in_provenance():
    seed_everything(0)
    model = create_model("dsr", pretrained=False, **TINY)
    fit_on(model, normal_images(2, 64), batch_size=2, max_steps=2)
    out = model.predict(torch.cat([normal_images(1, 64, seed=3), with_defect(normal_images(1, 64, seed=3))]))
    assert out.maps.shape == (2, 64, 64) and ((out.maps >= 0) & (out.maps <= 1)).all()
    assert "tests only" in model.provenance()["dsr_general_appearance_model"]["source"]
    with pytest.raises(ValueError, match="multiples of 32"):
        model.predict(normal_images(1, 80))
    with pytest.raises(ValueError, match="at least 64"):
        model.predict(normal_images(1, 32))


def test_stage1_command_trains_resumes_and_loads_as_the_general_model(tmp_path, capsys):
    write_images(tmp_path / "natural" / "a", n=3, size=(40, 56))
    write_images(tmp_path / "natural" / "b", n=2, size=(64, 36), suffix=".jpg")
    bb = tmp_path / "backbones"
    args = ["backbones", "train-dsr-vq", str(tmp_path / "natural"), "--backbone-dir", str(bb), "--batch-size", "2",
            "--img-size", "32", "--checkpoint-every", "1", "--quiet", "--num-embeddings", "16", "--embedding-dim", "8",
            "--hidden", "8", "--residual-hidden", "4", "--residual-layers", "1"]
    assert backbones_main([*args, "--steps", "2"]) == 0
    assert backbones_main([*args, "--steps", "3"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    record = __import__("json").loads((bb / "dsr_vq_model.json").read_text())
    assert record["num_images"] == 5 and record["steps"] == 3 and record["resumed_from_step"] == 2

    seed_everything(0)
    model = create_model("dsr", backbone_dir=bb, **TINY)
    general = model.provenance()["dsr_general_appearance_model"]
    assert general["source"] == str(bb / "dsr_vq_model.safetensors") and general["sha256"] == record["sha256"]
    fit_on(model, normal_images(2, 64), batch_size=2, max_steps=2)
    assert torch.isfinite(model.predict(normal_images(2, 64, seed=4)).scores).all()

    with pytest.raises(ValueError, match="another training"):  # same checkpoint, other settings
        backbones_main([*args, "--steps", "4", "--lr", "0.1"])


# the authors' DiscreteLatentModel parameter names for one residual layer (discrete_model.py)
def reference_keys() -> list[str]:
    res = ["_residual_stack._layers.0._block.1.weight", "_residual_stack._layers.0._block.3.weight"]
    wb = lambda name: [f"{name}.weight", f"{name}.bias"]  # noqa: E731
    keys = [f"_encoder_b.{k}" for k in [*wb("_conv_1"), *wb("_conv_2"), *wb("_conv_3"), *res]]
    keys += [f"_encoder_t.{k}" for k in [*wb("_conv_1"), *wb("_conv_2"), *res]]
    keys += [*wb("_pre_vq_conv_bot"), *wb("_pre_vq_conv_top"), *wb("upsample_t")]
    keys += [f"_vq_vae_{level}.{k}" for level in ("top", "bot") for k in ("_embedding.weight", "_ema_cluster_size",
                                                                           "_ema_w")]
    keys += [f"_decoder_b.{k}" for k in [*wb("_conv_1"), *res, *wb("_conv_trans_1"), *wb("_conv_trans_2")]]
    return keys


def test_reads_the_authors_layout_tensors_only(tmp_path):
    torch.manual_seed(3)
    trained = GeneralAppearanceModel(**{k: TINY_GENERAL[k] for k in ("hidden", "residual_layers", "residual_hidden",
                                                                      "num_embeddings", "embedding_dim")})
    ours = trained.state_dict()
    renamed = {from_reference_layout({k: None}).popitem()[0]: k for k in reference_keys()}
    assert set(renamed) == set(ours)  # the renames cover the authors' module tree exactly
    torch.save({ref: ours[key] for key, ref in renamed.items()}, tmp_path / "vq_model_pretrained_128_4096.pckl")
    model = create_model("dsr", backbone_dir=tmp_path, **TINY)
    assert model.provenance()["dsr_general_appearance_model"]["format"] == "dsr-reference"
    x = normal_images(1, 32)
    torch.testing.assert_close(model.general(x)[0], trained.eval()(x)[0])


def test_bad_general_model_files_fail_clearly(tmp_path):
    with pytest.raises(MissingWeightsError, match="(?s)dsr_vq_model.pckl.*curl.*train-dsr-vq"):
        create_model("dsr", backbone_dir=tmp_path, **TINY)
    small = GeneralAppearanceModel(8, 1, 4, 16, 8)
    torch.save(small.state_dict(), tmp_path / "dsr_vq_model.pckl")
    with pytest.raises(WeightsFileError, match="num_embeddings: file 16 vs configured 32"):
        create_model("dsr", backbone_dir=tmp_path, **{**TINY, "num_embeddings": 32})
    torch.save(small, tmp_path / "dsr_vq_model.pckl")  # a whole pickled module, not a state dict
    with pytest.raises(WeightsFileError, match="pickled Python objects"):
        create_model("dsr", backbone_dir=tmp_path, **TINY)
