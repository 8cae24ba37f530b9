"""DRAEM and the autoencoder (reconstruction models) through the one loop on tiny images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import fit_on, normal_images, with_defect, write_images

from adlib.models import create_model


def trained(name: str, images: torch.Tensor, steps: int = 1, **overrides):
    """The registered configuration ``name`` at test size, trained through the one loop."""
    model = create_model(name, pretrained=False, **{**SMALL.get(name, {}), **overrides})
    report = fit_on(model, images, batch_size=len(images) if model.learns_by == "gradient" else 4,
                    num_epochs=None, max_steps=steps)
    return model, report.loss_terms.get("loss", [])


SMALL = {"draem": {"base_width": 8, "disc_base_width": 8},
         "autoencoder": {"channels": (8, 16, 16, 32), "latent_channels": 8}}


def _texture_dir(root):
    write_images(root / "images" / "striped", size=(40, 40), suffix=".jpg")
    return root


def _streams(model, data_root):
    from adlib.run.loaders import auxiliary_streams
    from adlib.settings import Settings

    return auxiliary_streams(model, {"img_size": 32, "batch_size": 2}, Settings(data_root=data_root))


def test_draem_trains_on_streamed_dtd_textures_and_says_so(tmp_path):
    root = _texture_dir(tmp_path / "dtd")
    model = create_model("draem", pretrained=False, **SMALL["draem"])
    streams, sources = _streams(model, tmp_path)
    assert sources == {"textures": f"folder:{root.resolve() / 'images'}"}
    assert tuple(next(streams["textures"]).shape) == (2, 3, 32, 32)
    report = fit_on(model, normal_images(2, 32), batch_size=2, num_epochs=None, max_steps=2, aux=streams)
    assert {"loss", "l2", "ssim", "focal", "sspcab"} <= set(report.loss_terms)
    out = model.predict(normal_images(2, 32))
    assert out.maps.shape == (2, 32, 32) and float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    assert float(out.scores.max()) <= float(out.maps.flatten(1).amax(1).max()) + 1e-6


def test_draem_without_textures_falls_back_to_procedural_or_fails_clearly(tmp_path):
    from adlib.data import DataError
    from adlib.models.base import TrainBatch

    model = create_model("draem", pretrained=False, **SMALL["draem"])
    with pytest.raises(RuntimeError, match="setup_fit"):
        model.training_step(TrainBatch.of(normal_images(2, 32)), None)
    streams, sources = _streams(model, tmp_path)
    assert streams == {} and sources == {"textures": "fallback:procedural"}
    report = fit_on(model, normal_images(2, 32), batch_size=2, num_epochs=None, max_steps=1)
    assert np.isfinite(report.loss_history).all()
    strict = create_model("draem", pretrained=False, texture_fallback="error", **SMALL["draem"])
    with pytest.raises(DataError, match=r"(?s)auxiliary 'textures' images.*dtd/images.*To fix: download the Describ"):
        _streams(strict, tmp_path)


def test_draem_schedule_and_size_check():
    from adlib.models.base import FitContext

    model = create_model("draem", pretrained=False, **SMALL["draem"])
    model.setup_fit(FitContext(device=torch.device("cpu"), num_epochs=10))
    (spec,) = model.configure_optimizers()
    assert sorted(spec.scheduler.milestones) == [8, 9] and spec.interval == "epoch"
    with pytest.raises(ValueError, match="multiples of 32"):
        model.predict(normal_images(1, 48))
    no_sspcab = create_model("draem", pretrained=False, sspcab=False, **SMALL["draem"])
    report = fit_on(no_sspcab, normal_images(2, 32), batch_size=2, num_epochs=None, max_steps=1)
    assert "sspcab" not in report.loss_terms


def test_autoencoder_learns_and_scores_by_max_or_topk():
    torch.manual_seed(0)
    model, losses = trained("autoencoder", normal_images(4, 32), steps=8)
    assert losses[-1] < losses[0]
    out = model.predict(normal_images(2, 32, seed=4))
    torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))
    model.score, model.topk = "topk_mean", 0.1
    topk = model.predict(normal_images(2, 32, seed=4)).scores
    assert (topk <= out.scores + 1e-7).all()
    assert model.normalize is False  # registered default: raw [0, 1] images
    with pytest.raises(ValueError, match="multiples of 16"):
        model.predict(normal_images(1, 40))
