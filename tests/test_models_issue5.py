"""DFKDE, DFM, FastFlow (4 configurations), DRAEM and the autoencoder through the model contract.

Random-init backbones (pretrained=False), tiny synthetic images: "normal" images are noisy
horizontal ramps; "defective" ones carry a saturated red square over a quarter of the image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adlib.models import FitContext, create_model, list_models, resolve_config

ISSUE5_MODELS = ("dfkde", "dfm", "fastflow", "fastflow-resnet18", "fastflow-cait", "fastflow-deit", "draem",
                 "autoencoder")
#: the registered configurations at test size: same code paths, smaller widths / depths
SMALL = {
    "dfkde": ({}, 64),
    "dfm": ({"pooling_kernel_size": 2}, 64),
    "fastflow": ({"flow_steps": 2, "hidden_ratio": 0.25}, 32),
    "fastflow-resnet18": ({}, 32),
    "fastflow-cait": ({"backbone_kwargs": {"img_size": 32, "depth": 2}, "vit_block": 1}, 32),
    "fastflow-deit": ({"backbone_kwargs": {"img_size": 32, "depth": 2}, "vit_block": 1}, 32),
    "draem": ({"base_width": 8, "disc_base_width": 8}, 32),
    "autoencoder": ({"channels": (8, 16, 16, 32), "latent_channels": 8}, 32),
}


def normal_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, size).view(1, 1, 1, size).expand(n, 3, size, size)
    images = ramp * (0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))
    return (images + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def with_defect(images: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    n, _, h, w = out.shape
    s = h // 2
    for i in range(n):
        y, x = (int(torch.randint(0, h - s + 1, (1,), generator=g)) for _ in range(2))
        out[i, :, y:y + s, x:x + s] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return out


def context(tmp_texture_dir=None, epochs: int = 2, seed: int = 0, size: int = 32) -> FitContext:
    return FitContext(device=torch.device("cpu"), num_epochs=epochs, steps_per_epoch=1, num_train_images=4,
                      seed=seed, texture_dir=tmp_texture_dir, img_size=size)


def fit_small(name: str, images: torch.Tensor, steps: int = 1, **extra):
    """Build the small variant of ``name`` and run the contract like the training loop does."""
    overrides, size = SMALL[name]
    model = create_model(name, pretrained=False, **overrides, **extra)
    model.setup_fit(context(size=size))
    losses = []
    if model.learns_by == "one_pass":
        model.eval()
        with torch.no_grad():
            for chunk in images.split(4):
                model.collect(chunk)
    else:
        opt = model.configure_optimizers()
        model.train()
        for _ in range(steps):
            out = model.training_step(images)
            loss = out["loss"] if isinstance(out, dict) else out
            for o in opt:
                o.zero_grad()
            loss.backward()
            for o in opt:
                o.step()
            losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        model.finalize()
    return model, losses


# ----- registry -------------------------------------------------------------------------------------
def test_issue5_configurations_are_registered_with_seed_defaults():
    assert set(ISSUE5_MODELS) <= set(list_models())
    assert {"fastflow", "fastflow-resnet18", "fastflow-cait", "fastflow-deit"} <= set(list_models(family="flow"))
    assert {"draem", "autoencoder"} <= set(list_models(family="reconstruction"))
    assert "dfkde" in list_models(family="memory") and "dfm" in list_models(family="feature_adaptation")
    for name in ("fastflow", "fastflow-resnet18", "fastflow-cait", "fastflow-deit"):
        train = resolve_config(name).train
        assert (train["num_epochs"], train["batch_size"], train["normalize"]) == (500, 32, True)
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
    ae = resolve_config("autoencoder").train
    assert (ae["num_epochs"], ae["normalize"]) == (50, False)
    dfkde, dfm = resolve_config("dfkde"), resolve_config("dfm")
    assert (dfkde.model["backbone"], dfkde.model["n_pca_components"], dfkde.train["num_epochs"]) == ("resnet18", 16, 1)
    assert (dfm.model["backbone"], dfm.model["layer"], dfm.model["pooling_kernel_size"], dfm.model["pca_level"],
            dfm.model["score_type"]) == ("resnet50", "layer3", 4, 0.97, "fre")


# ----- every configuration: train, predict, save/load -------------------------------------------------
@pytest.mark.parametrize("name", ISSUE5_MODELS)
def test_configuration_trains_predicts_and_round_trips(name):
    size = SMALL[name][1]
    torch.manual_seed(0)
    model, losses = fit_small(name, normal_images(8 if name.startswith("df") else 2, size))
    assert all(np.isfinite(losses))
    test = torch.cat([normal_images(2, size, seed=9), with_defect(normal_images(1, size, seed=9))])
    out = model.predict(test)
    assert out.scores.shape == (3,) and torch.isfinite(out.scores).all()
    if model.produces_maps:
        assert out.maps.shape == (3, size, size) and torch.isfinite(out.maps).all()
    else:
        assert out.maps is None
    if name.startswith("fastflow") or name == "draem":  # probability maps, score from the map
        assert float(out.maps.min()) >= 0.0 and float(out.maps.max()) <= 1.0
    if name.startswith("fastflow") or name == "autoencoder":
        torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))

    state = st_load(st_save(model.saved_state()))  # through safetensors, as the artifacts do
    assert not any(k.startswith("extractor.") for k in state)  # frozen backbones are not saved
    fresh = create_model(name, pretrained=False, **SMALL[name][0])
    fresh.load_saved_state(state)
    fresh.eval()
    again = fresh.predict(test)
    torch.testing.assert_close(again.scores, out.scores, rtol=0, atol=0)
    if out.maps is not None:
        torch.testing.assert_close(again.maps, out.maps, rtol=0, atol=0)


# ----- DFKDE / DFM ---------------------------------------------------------------------------------------
def test_dfkde_is_image_level_and_ranks_defects_higher():
    model, _ = fit_small("dfkde", normal_images(12, 64))
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
    model, _ = fit_small("dfm", normal_images(12, 64), score_type=score_type)
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
        model.collect(normal_images(1, 32))  # layer3 of 32 px images is 2x2


# ----- FastFlow ------------------------------------------------------------------------------------------
def test_fastflow_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    _, losses = fit_small("fastflow-resnet18", normal_images(2, 32), steps=4)
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


# ----- DRAEM ------------------------------------------------------------------------------------------------
def _texture_dir(root):
    from PIL import Image

    folder = root / "images" / "striped"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"striped_{i:04d}.jpg")
    return root


def _draem_steps(model, images, steps=2):
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(steps):
        out = model.training_step(images)
        opt[0].zero_grad()
        out["loss"].backward()
        opt[0].step()
        losses.append(out)
    return losses


def test_draem_uses_the_texture_directory_and_reports_it(tmp_path):
    root = _texture_dir(tmp_path / "dtd")
    model = create_model("draem", pretrained=False, **SMALL["draem"][0])
    model.setup_fit(context(root))
    assert model.synthesis_source == f"dtd:{root.resolve()}"
    outs = _draem_steps(model, normal_images(2, 32))
    assert {"loss", "l2", "ssim", "focal", "sspcab"} <= set(outs[0])
    model.eval()
    out = model.predict(normal_images(2, 32))
    assert out.maps.shape == (2, 32, 32) and float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    assert float(out.scores.max()) <= float(out.maps.flatten(1).amax(1).max()) + 1e-6


def test_draem_without_textures_falls_back_to_procedural_or_fails_clearly():
    model = create_model("draem", pretrained=False, **SMALL["draem"][0])
    with pytest.raises(RuntimeError, match="setup_fit"):
        model.training_step(normal_images(2, 32))
    model.setup_fit(context(None))
    assert model.synthesis_source == "procedural"
    assert all(torch.isfinite(o["loss"]) for o in _draem_steps(model, normal_images(2, 32), steps=1))
    strict = create_model("draem", pretrained=False, texture_fallback="error", **SMALL["draem"][0])
    with pytest.raises(FileNotFoundError, match="texture directory"):
        strict.setup_fit(context(None))


def test_draem_schedule_and_size_check():
    model = create_model("draem", pretrained=False, **SMALL["draem"][0])
    model.setup_fit(context(None, epochs=10))
    (scheduler,) = model.configure_schedulers(model.configure_optimizers())
    assert sorted(scheduler.milestones) == [8, 9]
    with pytest.raises(ValueError, match="multiples of 32"):
        model.predict(normal_images(1, 48))
    no_sspcab = create_model("draem", pretrained=False, sspcab=False, **SMALL["draem"][0])
    no_sspcab.setup_fit(context(None))
    assert "sspcab" not in _draem_steps(no_sspcab, normal_images(2, 32), steps=1)[0]


# ----- autoencoder --------------------------------------------------------------------------------------------
def test_autoencoder_learns_and_scores_by_max_or_topk():
    torch.manual_seed(0)
    model, losses = fit_small("autoencoder", normal_images(4, 32), steps=8)
    assert losses[-1] < losses[0]
    out = model.predict(normal_images(2, 32, seed=4))
    torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))
    model.score, model.topk = "topk_mean", 0.1
    topk = model.predict(normal_images(2, 32, seed=4)).scores
    assert (topk <= out.scores + 1e-7).all()
    assert model.normalize is False  # seed default: raw [0, 1] images
    with pytest.raises(ValueError, match="multiples of 16"):
        model.predict(normal_images(1, 40))
