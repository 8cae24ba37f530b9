"""The one training loop, driven with two tiny models written here (one per way of learning)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adlib.models.base import AnomalyModel, AnomalyOutput, FitContext
from adlib.training import NonFiniteLossError, fit, seed_everything


class Images(Dataset):
    def __init__(self, n: int = 12, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = 0.5 + 0.05 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0}


class MeanModel(AnomalyModel):
    """One-pass: remembers the mean image; score = max squared distance to it."""

    learns_by = "one_pass"

    def __init__(self) -> None:
        super().__init__(normalize=False)
        self.register_buffer("total", torch.zeros(3, 16, 16))
        self.register_buffer("count", torch.zeros(()))
        self.finalized = False

    def collect(self, images):
        self.total += images.sum(0)
        self.count += len(images)

    def finalize(self):
        self.finalized = True

    def predict(self, images):
        maps = ((images - self.total / self.count) ** 2).mean(1)
        return AnomalyOutput(scores=maps.flatten(1).amax(1), maps=maps)


class TinyAE(AnomalyModel):
    """Gradient: a 1x1-conv autoencoder; optional NaN injection and post-fit pass."""

    def __init__(self, lr: float = 0.05, nan_at_step: int | None = None) -> None:
        super().__init__(normalize=False)
        self.net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 1))
        self.lr, self.nan_at_step, self.steps, self.collected, self.epochs_seen = lr, nan_at_step, 0, 0, []

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=self.lr)]

    def training_step(self, images, optimizers=None):
        self.steps += 1
        loss = ((self.net(images) - images) ** 2).mean()
        if self.nan_at_step is not None and self.steps >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss}

    def on_epoch_end(self, epoch):
        self.epochs_seen.append(epoch)

    def collect(self, images):
        self.collected += len(images)

    def predict(self, images):
        maps = ((self.net(images) - images) ** 2).mean(1)
        return AnomalyOutput(scores=maps.flatten(1).amax(1), maps=maps)


def _context(epochs: int = 1) -> FitContext:
    return FitContext(device=torch.device("cpu"), num_epochs=epochs, steps_per_epoch=3, num_train_images=12)


def _loader(batch_size: int = 4) -> DataLoader:
    return DataLoader(Images(), batch_size=batch_size, shuffle=False)


def test_one_pass_model_sees_every_image_once_and_is_finalized():
    model = MeanModel()
    report = fit(model, _loader(), _context(), num_epochs=5, progress=False)
    assert model.count.item() == 12 and model.finalized
    assert report.epochs_run == 1 and report.steps == 0
    assert report.peak_rss_mb > 0 and report.fit_seconds > 0


def test_gradient_model_loss_decreases_and_epochs_are_reported():
    model = TinyAE()
    report = fit(model, _loader(), _context(10), num_epochs=10, progress=False)
    assert report.epochs_run == 10 and report.steps == 30
    assert model.epochs_seen == list(range(10))
    assert report.loss_history[-1] < report.loss_history[0]
    assert not model.training  # left in eval mode for prediction


def test_max_steps_overrides_epochs():
    report = fit(TinyAE(), _loader(), _context(), num_epochs=100, max_steps=5, progress=False)
    assert report.steps == 5 and report.epochs_run == 2


def test_nan_loss_stops_with_clear_error():
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        fit(TinyAE(nan_at_step=2), _loader(), _context(), num_epochs=3, progress=False)


def test_post_fit_pass_collects_training_images():
    class Calibrated(TinyAE):
        post_fit_pass = True

    model = Calibrated()
    fit(model, _loader(), _context(), num_epochs=1, progress=False)
    assert model.collected == 12


def test_early_stopping_on_validation_target_and_patience():
    calls = iter([0.6, 0.7, 0.95, 0.99])
    report = fit(TinyAE(), _loader(), _context(), num_epochs=10, validate=lambda m: next(calls), validate_every=1,
                 early_stopping_target=0.9, progress=False)
    assert report.stopped_early and report.epochs_run == 3 and "target" in report.stop_reason
    assert report.val_history == [0.6, 0.7, 0.95]

    flat = iter([0.8, 0.7, 0.7, 0.7, 0.7])
    report = fit(TinyAE(), _loader(), _context(), num_epochs=10, validate=lambda m: next(flat), validate_every=1,
                 early_stopping_patience=2, progress=False)
    assert report.stopped_early and report.epochs_run == 3 and "no improvement" in report.stop_reason


def test_early_stopping_on_training_loss_without_validation():
    # lr=0 keeps the loss flat, so patience 2 stops after 3 epochs
    report = fit(TinyAE(lr=0.0), _loader(), _context(), num_epochs=20, early_stopping_patience=2, progress=False)
    assert report.stopped_early and report.epochs_run == 3


def test_same_seed_gives_identical_training():
    def run() -> list[float]:
        seed_everything(7)
        model = TinyAE()
        loader = DataLoader(Images(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
        return fit(model, loader, _context(3), num_epochs=3, progress=False).loss_history

    assert run() == run()
