"""The one training loop and the model contract, driven with small real modules written here:
one-pass and gradient learning, optimiser specs on loss keys, the Stepper (manual stepping,
clipping, per-step schedules), phases, data passes, labels/masks/auxiliary streams in the batch,
budgets, early stopping and failure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adlib.models.base import AnomalyModel, AnomalyOutput, DataPass, OptimizerSpec, TrainBatch
from adlib.training import (NonFiniteLossError, Validator, fit, phase_at, schedule_length, seed_everything)
from tiny import fit_on, loader

IMAGES = 0.5 + 0.05 * torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class MeanModel(AnomalyModel):
    """One-pass: remembers the mean image; score = max squared distance to it."""

    learns_by = "one_pass"

    def __init__(self) -> None:
        super().__init__(normalize=False)
        self.register_buffer("total", torch.zeros(3, 16, 16))
        self.register_buffer("count", torch.zeros(()))
        self.finalized = False

    def collect(self, batch, pass_name):
        assert pass_name == "fit" and not torch.is_grad_enabled() and not self.training
        self.total += batch.images.sum(0)
        self.count += len(batch)

    def finalize(self):
        self.finalized = True

    def predict(self, images):
        maps = ((images - self.total / self.count) ** 2).mean(1)
        return AnomalyOutput(scores=maps.flatten(1).amax(1), maps=maps)


class TinyAE(AnomalyModel):
    """Gradient: a 1x1-conv autoencoder; optional NaN injection; records every step it sees."""

    def __init__(self, lr: float = 0.05, nan_at_step: int | None = None) -> None:
        super().__init__(normalize=False)
        self.net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 1))
        self.lr, self.nan_at_step = lr, nan_at_step
        self.steps, self.epochs_seen, self.batches = [], [], []

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=self.lr)]

    def training_step(self, batch, step, stepper=None):
        self.steps.append(step)
        self.batches.append(batch)
        loss = ((self.net(batch.images) - batch.images) ** 2).mean()
        if self.nan_at_step is not None and step.index >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "half": loss.detach() / 2}

    def on_epoch_end(self, epoch):
        self.epochs_seen.append(epoch)

    def predict(self, images):
        maps = ((self.net(images) - images) ** 2).mean(1)
        return AnomalyOutput(scores=maps.flatten(1).amax(1), maps=maps)


# ---------------------------------------------------------------------------------------------- basics
def test_one_pass_model_sees_every_image_once_and_is_finalized():
    model = MeanModel()
    report = fit_on(model, IMAGES, num_epochs=5)
    assert model.count.item() == 12 and model.finalized
    assert report.epochs_run == 1 and report.steps == 0 and report.passes == {"fit": 12}
    assert report.peak_rss_mb > 0 and report.fit_seconds > 0


def test_gradient_model_loss_decreases_and_every_logged_key_is_kept():
    model = TinyAE()
    report = fit_on(model, IMAGES, num_epochs=10)
    assert report.epochs_run == 10 and report.steps == 30 == report.total_steps
    assert model.epochs_seen == list(range(10))
    assert report.loss_history[-1] < report.loss_history[0]
    assert report.loss_terms["half"] == pytest.approx([v / 2 for v in report.loss_history])
    assert not model.training  # left in eval mode for prediction
    assert report.stop_reason == "completed 30 of 30 steps"


def test_step_objects_count_the_whole_fit():
    model = TinyAE()
    fit_on(model, IMAGES, num_epochs=3)
    assert [s.index for s in model.steps] == list(range(9))
    assert [s.epoch for s in model.steps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {s.total for s in model.steps} == {9} and {s.phase for s in model.steps} == {"train"}


def test_budget_is_whichever_of_epochs_and_steps_ends_first():
    assert schedule_length(3, 100, 5) == (5, 2)
    assert schedule_length(3, 1, 5) == (3, 1)
    assert schedule_length(3, None, 7) == (7, 3)
    with pytest.raises(ValueError, match="num_epochs or max_steps"):
        schedule_length(3, None, None)
    report = fit_on(TinyAE(), IMAGES, num_epochs=100, max_steps=5)
    assert report.steps == 5 and report.epochs_run == 2 and report.stop_reason == "completed 5 of 5 steps"


def test_labels_and_masks_reach_the_training_step():
    model = TinyAE()
    labels = torch.tensor([0, 1] * 6)
    masks = torch.zeros(12, 1, 16, 16)
    masks[1::2, :, 4:8, 4:8] = 1
    from adlib.models.base import FitContext
    from adlib.training import FitData

    fit(model, FitData(loader(IMAGES, 4, labels=labels, masks=masks)), FitContext(device=torch.device("cpu")),
        num_epochs=1, progress=False)
    first = model.batches[0]
    assert isinstance(first, TrainBatch) and first.labels.tolist() == [0, 1, 0, 1]
    assert first.masks.shape == (4, 1, 16, 16) and first.masks[1].sum() == 16 and first.masks[0].sum() == 0


def test_nan_loss_and_nan_weights_stop_with_clear_errors():
    with pytest.raises(NonFiniteLossError, match="loss 'loss' became nan"):
        fit_on(TinyAE(nan_at_step=2), IMAGES, num_epochs=3)

    class Exploding(TinyAE):
        def on_epoch_end(self, epoch):
            with torch.no_grad():
                self.net[0].weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="weight net.0.weight became NaN"):
        fit_on(Exploding(), IMAGES, num_epochs=1)


def test_same_seed_gives_identical_training():
    def run() -> list[float]:
        seed_everything(7)
        return fit_on(TinyAE(), IMAGES, num_epochs=3).loss_history

    assert run() == run()


# ---------------------------------------------------------------------------------------------- optimisers
class TwoPlayers(AnomalyModel):
    """GAN-like: ``g`` (generator, loss "g_loss") then ``d`` (discriminator, loss "d_loss"), each
    loss touching the other player's parameters; SGD so every update is exactly lr * grad."""

    def __init__(self) -> None:
        super().__init__(normalize=False)
        self.g = nn.Linear(3, 3)
        self.d = nn.Linear(3, 1)
        self.order: list[str] = []
        self.expected: dict[str, dict[str, torch.Tensor]] = {}

    def configure_optimizers(self):
        opt_g = torch.optim.SGD(self.g.parameters(), lr=0.1)
        opt_d = torch.optim.SGD(self.d.parameters(), lr=0.1)
        opt_g.register_step_pre_hook(lambda *_: self.order.append("g"))
        opt_d.register_step_pre_hook(lambda *_: self.order.append("d"))
        return [OptimizerSpec(opt_g, loss="g_loss"), OptimizerSpec(opt_d, loss="d_loss")]

    def losses(self, x):
        fake = self.g(x)
        g_loss = -self.d(fake).mean() + fake.square().mean()
        d_loss = self.d(fake.detach()).mean() - self.d(x).mean() + 0.1 * self.d.weight.square().sum()
        return g_loss, d_loss

    def training_step(self, batch, step, stepper=None):
        x = batch.images.mean(dim=(2, 3))
        g_loss, d_loss = self.losses(x)
        if step.index == 0:  # what each optimiser must do: its own loss, its own parameters only
            g_grad = torch.autograd.grad(g_loss, list(self.g.parameters()), retain_graph=True)
            d_grad = torch.autograd.grad(d_loss, list(self.d.parameters()), retain_graph=True)
            self.expected = {"g": {n: p.detach() - 0.1 * gr for (n, p), gr in zip(self.g.named_parameters(), g_grad)},
                             "d": {n: p.detach() - 0.1 * gr for (n, p), gr in zip(self.d.named_parameters(), d_grad)}}
        return {"g_loss": g_loss, "d_loss": d_loss}

    def predict(self, images):
        return AnomalyOutput(scores=self.d(images.mean(dim=(2, 3)))[:, 0])


def test_two_optimisers_step_in_order_each_on_its_own_loss_key():
    model = TwoPlayers()
    report = fit_on(model, IMAGES[:4], max_steps=1, num_epochs=None)
    assert model.order == ["g", "d"] and report.optimizer_steps == 2
    for player in ("g", "d"):
        for name, param in getattr(model, player).named_parameters():
            torch.testing.assert_close(param.detach(), model.expected[player][name])
    assert set(report.loss_terms) == {"g_loss", "d_loss"}


class FiberModel(AnomalyModel):
    """Self-stepping (CFlow-like): three optimiser steps per batch through the Stepper, with a
    per-step scheduler."""

    manual_optimization = True

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(normalize=False)
        self.w = nn.Parameter(torch.ones(3))
        self.scale, self.calls, self.grad_norms = scale, 0, []

    def configure_optimizers(self):
        opt = torch.optim.SGD([self.w], lr=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
        return [OptimizerSpec(opt, self.sched, interval="step")]

    def training_step(self, batch, step, stepper=None):
        assert stepper is not None
        x = batch.images.mean(dim=(2, 3))
        for chunk in x.split(len(x) // 3 or 1)[:3]:
            loss = self.scale * ((chunk * self.w).sum(1) - 1).square().mean()
            stepper.step(loss)
            self.grad_norms.append(float(torch.linalg.vector_norm(self.w.grad)))
        return {"loss": loss.detach()}

    def predict(self, images):
        return AnomalyOutput(scores=(images.mean(dim=(2, 3)) * self.w).sum(1))


def test_self_stepping_model_steps_through_the_stepper_and_its_scheduler_counts_every_step():
    model = FiberModel()
    report = fit_on(model, IMAGES, batch_size=6, num_epochs=2)
    assert report.steps == 4 and report.optimizer_steps == 12 and model.sched.last_epoch == 12
    assert report.loss_history and all(v == v for v in report.loss_history)


def test_per_step_scheduler_is_stepped_exactly_total_times():
    class Scheduled(TinyAE):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            self.sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=7)
            return [OptimizerSpec(opt, self.sched, interval="step")]

    model = Scheduled()
    report = fit_on(model, IMAGES, num_epochs=None, max_steps=7)  # 3 batches per epoch: stops mid-epoch
    assert report.steps == 7 and model.sched.last_epoch == 7
    assert model.sched.get_last_lr() == [0.0]

    class PerEpoch(TinyAE):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            self.sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return [OptimizerSpec(opt, self.sched, interval="epoch")]

    model = PerEpoch()
    fit_on(model, IMAGES, num_epochs=4)
    assert model.sched.last_epoch == 4


def test_gradient_clipping_bounds_the_gradient_norm():
    model = FiberModel(scale=1e4)
    fit_on(model, IMAGES, batch_size=6, num_epochs=1, grad_clip_norm=0.5)
    assert max(model.grad_norms) <= 0.5 + 1e-5
    unclipped = FiberModel(scale=1e4)
    fit_on(unclipped, IMAGES, batch_size=6, num_epochs=1)
    assert max(unclipped.grad_norms) > 10


# ---------------------------------------------------------------------------------------------- phases
class Phased(AnomalyModel):
    """Two sub-networks trained one after the other (DSR-like)."""

    phases = (("first", 0.25), ("second", 0.75))

    def __init__(self) -> None:
        super().__init__(normalize=False)
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
        self.seen: list[str] = []
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_optimizers(self):
        return [OptimizerSpec(torch.optim.SGD(self.a.parameters(), lr=0.1), loss="loss_a", phase="first"),
                OptimizerSpec(torch.optim.SGD(self.b.parameters(), lr=0.1), loss="loss_b", phase="second")]

    def training_step(self, batch, step, stepper=None):
        self.seen.append(step.phase)
        self.snapshots.append((self.a.weight.detach().clone(), self.b.weight.detach().clone()))
        x = batch.images.mean(dim=(2, 3))
        out = {"loss_a": self.a(x).square().mean()} if step.phase == "first" else {"loss_b": self.b(x).square().mean()}
        return out

    def predict(self, images):
        x = images.mean(dim=(2, 3))
        return AnomalyOutput(scores=(self.a(x) + self.b(x))[:, 0])


def test_phases_switch_at_the_declared_fraction_and_only_their_optimiser_steps():
    assert [phase_at(i, 8, Phased.phases) for i in range(8)] == ["first"] * 2 + ["second"] * 6
    model = Phased()
    fit_on(model, IMAGES[:8], batch_size=1, num_epochs=1)
    assert model.seen == ["first"] * 2 + ["second"] * 6
    a_changes = [not torch.equal(s[0], t[0]) for s, t in zip(model.snapshots, model.snapshots[1:])]
    b_changes = [not torch.equal(s[1], t[1]) for s, t in zip(model.snapshots, model.snapshots[1:])]
    assert a_changes == [True, True] + [False] * 5
    assert b_changes == [False, False] + [True] * 5


def test_bad_phases_are_refused():
    class Broken(Phased):
        phases = (("first", 0.5), ("second", 0.7))

    with pytest.raises(ValueError, match="summing to 1"):
        fit_on(Broken(), IMAGES)


# ---------------------------------------------------------------------------------------------- data passes
class Passes(TinyAE):
    """Statistics before training (CFA/EfficientAD-like) and after it on the validation split."""

    data_passes = (DataPass("stats", "before"), DataPass("quantiles", "after", "validation"))

    def __init__(self) -> None:
        super().__init__()
        self.pass_images = {"stats": 0, "quantiles": 0}
        self.ended: list[str] = []
        self.seen_at_first_step = None

    def collect(self, batch, pass_name):
        assert not torch.is_grad_enabled() and not self.training
        self.pass_images[pass_name] += len(batch)

    def end_pass(self, pass_name):
        self.ended.append(pass_name)

    def training_step(self, batch, step, stepper=None):
        if self.seen_at_first_step is None:
            self.seen_at_first_step = (dict(self.pass_images), list(self.ended))
        return super().training_step(batch, step, stepper)


def test_a_pre_fit_pass_sees_every_training_batch_before_the_first_step():
    model = Passes()
    report = fit_on(model, IMAGES, num_epochs=2, validation=IMAGES[:5])
    assert model.seen_at_first_step == ({"stats": 12, "quantiles": 0}, ["stats"])
    assert model.pass_images == {"stats": 12, "quantiles": 5} and model.ended == ["stats", "quantiles"]
    assert report.passes == {"stats": 12, "quantiles": 5}


def test_a_validation_pass_without_a_validation_split_is_a_clear_error():
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        fit_on(Passes(), IMAGES, num_epochs=1)


# ---------------------------------------------------------------------------------------------- aux streams
class TextureUser(TinyAE):
    def __init__(self) -> None:
        super().__init__()
        self.aux_shapes = []

    def training_step(self, batch, step, stepper=None):
        self.aux_shapes.append(tuple(batch.aux["textures"].shape))
        return super().training_step(batch, step, stepper)


def test_an_auxiliary_stream_hands_one_batch_per_step():
    def endless():
        while True:
            yield torch.rand(2, 3, 16, 16)

    model = TextureUser()
    fit_on(model, IMAGES, num_epochs=1, aux={"textures": endless()})
    assert model.aux_shapes == [(2, 3, 16, 16)] * 3


# ---------------------------------------------------------------------------------------------- early stopping
def test_early_stopping_on_a_validator_target_and_patience():
    calls = iter([0.6, 0.7, 0.95, 0.99])
    report = fit_on(TinyAE(), IMAGES, num_epochs=10, validator=Validator("auroc", lambda m: next(calls), True),
                    validate_every=1, early_stopping_target=0.9)
    assert report.stopped_early and report.epochs_run == 3 and "target" in report.stop_reason
    assert report.val_history == [0.6, 0.7, 0.95] and report.val_metric == "auroc"

    losses = iter([0.5, 0.6, 0.6, 0.6, 0.6])
    report = fit_on(TinyAE(), IMAGES, num_epochs=10, validator=Validator("loss", lambda m: next(losses), False),
                    validate_every=1, early_stopping_patience=2)
    assert report.stopped_early and report.epochs_run == 3 and "no improvement" in report.stop_reason


def test_early_stopping_on_training_loss_without_validation():
    # lr=0 keeps the loss flat, so patience 2 stops after 3 epochs
    report = fit_on(TinyAE(lr=0.0), IMAGES, num_epochs=20, early_stopping_patience=2)
    assert report.stopped_early and report.epochs_run == 3


# ---------------------------------------------------------------------------------------------- micro-batches
def test_micro_batches_give_the_whole_batchs_step_with_a_quarter_of_the_images_alive():
    whole, split = TinyAE(), TinyAE()
    split.load_state_dict(whole.state_dict())
    whole_report = fit_on(whole, IMAGES, batch_size=12, num_epochs=3)
    split_report = fit_on(split, IMAGES, batch_size=12, num_epochs=3, micro_batch_size=3)
    assert [len(b) for b in whole.batches] == [12] * 3 and [len(b) for b in split.batches] == [3] * 12
    assert split_report.optimizer_steps == whole_report.optimizer_steps == 3
    for name, param in whole.named_parameters():  # the same three SGD steps: losses are means over images
        torch.testing.assert_close(split.state_dict()[name], param.detach(), rtol=1e-5, atol=1e-6)
    for key in ("loss", "half"):  # logged as the whole batch's values
        assert split_report.loss_terms[key] == pytest.approx(whole_report.loss_terms[key], rel=1e-5)


def test_micro_batches_keep_labels_masks_and_auxiliary_batches_in_step():
    images, labels = IMAGES[:8], torch.arange(8)
    masks = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 16, 16)
    aux = {"textures": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16)}
    parts = TrainBatch(images, labels, masks, aux).split(3)
    assert [len(p) for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p.images for p in parts]), images)
    assert [p.labels.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.masks[:, 0, 0, 0].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.aux["textures"][:, 0, 0, 0].tolist() for p in parts] == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="textures hold fewer images.*raise micro_batch_size"):
        TrainBatch(images, labels, masks, aux).split(1)


def test_micro_batches_are_refused_where_the_loop_cannot_accumulate_one_optimisers_gradients():
    with pytest.raises(ValueError, match="TwoPlayers steps 2 optimisers on every batch"):
        fit_on(TwoPlayers(), IMAGES[:4], num_epochs=1, micro_batch_size=2)
    with pytest.raises(ValueError, match="FiberModel steps its optimisers itself"):
        fit_on(FiberModel(), IMAGES, num_epochs=1, micro_batch_size=2)
    model = Phased()  # one optimiser per phase: each phase's optimiser accumulates its parts
    report = fit_on(model, IMAGES, num_epochs=4, micro_batch_size=2)
    assert report.optimizer_steps == report.steps == 12


def test_configurations_that_cannot_train_in_micro_batches_are_refused_before_any_job_runs():
    from adlib.models.checks import check_config

    [two] = check_config("ganomaly", {"micro_batch_size": 8})
    [manual] = check_config("cflow", {"micro_batch_size": 8})
    assert two.key == manual.key == "micro_batch_size"
    assert "2 optimisers on every batch" in two.message and "steps its optimisers itself" in manual.message
    assert check_config("stfpm", {"micro_batch_size": 4}) == []
    assert check_config("dsr", {"micro_batch_size": 4}) == []  # one optimiser per phase
    [zero] = check_config("stfpm", {"micro_batch_size": 0})
    assert zero.key == "micro_batch_size" and ">= 1" in zero.message
