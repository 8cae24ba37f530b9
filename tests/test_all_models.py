"""Every registered configuration trains through the one loop, predicts, and round-trips its weights.

Random-init backbones and tiny images keep this fast. Big architectures run at reduced size
through :mod:`adlib.models.smoke`; their registered configurations stay the papers'.
"""
from __future__ import annotations

import pytest
import torch
from tiny import fit_on, normal_images, required_streams, with_defect

from adlib.artifacts import load_model, run_config, save_model, write_record
from adlib.models.registry import build_model, list_models, resolve_config
from adlib.models.smoke import smoke_overrides
from adlib.training import seed_everything

@pytest.mark.parametrize("name", list_models())
def test_model_trains_predicts_and_round_trips(name, tmp_path):
    overrides = smoke_overrides(name)
    seed_everything(0)
    config = resolve_config(name, **overrides)
    model = build_model(config, pretrained=False)
    size = int(config.train["img_size"])
    needs_validation = config.train["validation_fraction"] or any(p.split == "validation" for p in model.data_passes)
    report = fit_on(model, normal_images(8, size), batch_size=int(config.train["batch_size"]),
                    num_epochs=config.train["num_epochs"], max_steps=config.train["max_steps"],
                    validation=normal_images(4, size, seed=5) if needs_validation else None,
                    aux=required_streams(model, size))
    assert all(v == v for v in report.loss_history)  # no NaN

    test = torch.cat([normal_images(2, size, seed=9), with_defect(normal_images(1, size, seed=9))])
    out = model.predict(test)
    assert out.scores.shape == (3,) and torch.isfinite(out.scores).all()
    if model.produces_maps:
        assert out.maps is not None and out.maps.shape == (3, size, size) and torch.isfinite(out.maps).all()
    else:
        assert out.maps is None
    # scoring batches may hold any number of images (CPU_SCORING_BATCH): one by one gives the same
    alone = [model.predict(image[None]) for image in test]
    torch.testing.assert_close(torch.cat([a.scores for a in alone]), out.scores, rtol=1e-4, atol=1e-5)
    if model.produces_maps:
        scale = float(out.maps.abs().max())  # DSR's stacked U-Nets round batch-dependently: 1.5e-4 of 1
        torch.testing.assert_close(torch.cat([a.maps for a in alone]), out.maps, rtol=1e-4, atol=1e-3 * scale)

    cfg = run_config(config, dataset="synthetic", category="widget", seed=0, pretrained=False)
    save_model(tmp_path, model, cfg)
    write_record(tmp_path)
    reloaded, saved_cfg = load_model(tmp_path)
    assert saved_cfg["model"] == config.model
    again = reloaded.predict(test)
    torch.testing.assert_close(again.scores, out.scores, rtol=0, atol=0)
    if model.produces_maps:
        torch.testing.assert_close(again.maps, out.maps, rtol=0, atol=0)
