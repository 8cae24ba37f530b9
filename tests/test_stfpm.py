"""STFPM through the gradient-model contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny import fit_on

from adlib.models import TrainBatch, create_model, resolve_config
from adlib.models.stfpm import feature_discrepancy

BACKBONE = "resnet10t"
IMAGES = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))


def train_steps(model, steps: int) -> list[float]:
    """``steps`` optimiser steps on the same 4 images through the one loop (one batch an epoch)."""
    return fit_on(model, IMAGES, batch_size=4, num_epochs=steps).loss_history


@pytest.fixture(scope="module")
def trained():
    model = create_model("stfpm", backbone=BACKBONE, pretrained=False, lr=0.05)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = train_steps(model, 6)
    return model.eval(), losses, teacher_before


def test_stfpm_defaults_follow_the_paper():
    cfg = resolve_config("stfpm")
    assert cfg.model["backbone"] == "resnet18" and cfg.model["layers"] == ["layer1", "layer2", "layer3"]
    assert (cfg.model["lr"], cfg.model["momentum"], cfg.model["weight_decay"]) == (0.4, 0.9, 1e-4)
    assert cfg.train["num_epochs"] == 100 and cfg.train["batch_size"] == 32
    assert cfg.train["micro_batch_size"] == 8  # adlib, CPU memory: docs/models.md
    optimizer = create_model("stfpm", backbone=BACKBONE, pretrained=False).configure_optimizers()[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.4


def test_student_starts_different_from_a_random_teacher():
    model = create_model("stfpm", backbone=BACKBONE, pretrained=False)
    t, s = model.teacher.state_dict(), model.student.state_dict()
    assert any(not torch.equal(t[k], s[k]) for k in t if k.endswith("weight"))
    assert model.training_step(TrainBatch.of(IMAGES), None).item() > 0.01


def test_loss_is_half_squared_distance_of_normalised_features():
    model = create_model("stfpm", backbone=BACKBONE, pretrained=False).eval()
    with torch.no_grad():
        x = model.normalize_input(IMAGES)
        teacher, student = model.teacher(x), model.student(x)
        want = sum(0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1).mean()
                   for t, s in zip(teacher, student))
        assert model.training_step(TrainBatch.of(IMAGES), None).item() == pytest.approx(want.item(), rel=1e-5)
    a = torch.tensor([[[[3.0]], [[4.0]]]])  # unit vector (0.6, 0.8) at one position
    b = torch.tensor([[[[-4.0]], [[3.0]]]])  # orthogonal unit vector
    assert feature_discrepancy(a, b).item() == pytest.approx(1.0)
    assert feature_discrepancy(a, 2 * a).item() == pytest.approx(0.0, abs=1e-7)


def test_training_lowers_the_loss_and_leaves_the_teacher_alone(trained):
    model, losses, teacher_before = trained
    assert losses[-1] < losses[0]
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_stfpm_predicts_product_maps_at_input_size(trained):
    model, _, _ = trained
    out = model.predict(IMAGES[:2])
    assert out.scores.shape == (2,) and out.maps.shape == (2, 48, 48)
    assert (out.maps >= 0).all()
    torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))


def test_stfpm_save_load_keeps_the_student_only(trained, tmp_path):
    model, _, _ = trained
    state = model.saved_state()
    assert state and all(k.startswith("student.") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    fresh = create_model("stfpm", backbone=BACKBONE, pretrained=False, lr=0.05)
    fresh.load_saved_state(load_file(tmp_path / "model.safetensors"))
    fresh.eval()
    a, b = model.predict(IMAGES), fresh.predict(IMAGES)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_checkpointed_student_trains_to_the_same_weights_and_running_statistics():
    """Recomputing the student's stages in backward changes memory, not training: the same
    losses, weights and batch-norm running statistics (counted once per step) as without."""
    plain = create_model("stfpm", backbone=BACKBONE, pretrained=False, lr=0.05)
    checkpointed = create_model("stfpm", backbone=BACKBONE, pretrained=False, lr=0.05, checkpoint_student=True)
    assert train_steps(checkpointed, 3) == pytest.approx(train_steps(plain, 3), rel=1e-6)
    want, got = plain.student.state_dict(), checkpointed.student.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert int(got["model.layer1.0.bn1.num_batches_tracked"]) == 3


def test_micro_batches_run_the_student_on_parts_and_step_once_per_batch():
    """The registered CPU default cuts each batch: the student sees parts of at most
    micro_batch_size images, one optimiser step per batch, and the loss still falls."""
    model = create_model("stfpm", backbone=BACKBONE, pretrained=False, lr=0.05)
    sizes = []
    model.student.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    report = fit_on(model, IMAGES, batch_size=4, num_epochs=3, micro_batch_size=2)
    assert sizes == [2] * 6 and report.optimizer_steps == 3
    assert report.loss_history[-1] < report.loss_history[0]
