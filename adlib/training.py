"""The one training loop that drives every model through the contract in :mod:`adlib.models.base`."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import resource
import time
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from adlib.models.base import AnomalyModel, FitContext

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training cannot continue meaningfully."""


@dataclasses.dataclass
class FitReport:
    fit_seconds: float = 0.0
    epochs_run: int = 0
    steps: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)  # mean loss per epoch
    val_history: list[float] = dataclasses.field(default_factory=list)  # validation AUROC per check
    stopped_early: bool = False
    stop_reason: str = ""
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    @property
    def final_loss(self) -> float | None:
        return self.loss_history[-1] if self.loss_history else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "final_loss": self.final_loss}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; in deterministic mode ask torch for reproducible kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _loss_value(out: torch.Tensor | dict) -> torch.Tensor:
    loss = out["loss"] if isinstance(out, dict) else out
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"training loss became {loss.item()}: the run is stopped. Try a lower learning rate, "
            "mixed precision off (amp=False) or check the input data for constant images.")
    return loss


class _EarlyStopping:
    """The seed's early stopping: ``patience`` checks without improvement, or a target value."""

    def __init__(self, patience: int | None, target: float | None, higher_is_better: bool) -> None:
        self.patience, self.target, self.higher = patience, target, higher_is_better
        self.best: float | None = None
        self.bad_checks = 0

    def update(self, value: float) -> str:
        """Return a reason to stop, or "" to go on."""
        if self.target is not None and (value >= self.target if self.higher else value <= self.target):
            return f"reached target {self.target} ({value:.4f})"
        improved = self.best is None or (value > self.best if self.higher else value < self.best)
        if improved:
            self.best, self.bad_checks = value, 0
        else:
            self.bad_checks += 1
        if self.patience is not None and self.bad_checks >= self.patience:
            return f"no improvement for {self.patience} checks (best {self.best:.4f})"
        return ""


def fit(model: AnomalyModel, train_loader: DataLoader, context: FitContext, *,
        num_epochs: int = 1, max_steps: int | None = None, amp: bool = True,
        validate: Callable[[AnomalyModel], float | None] | None = None, validate_every: int | None = None,
        early_stopping_patience: int | None = None, early_stopping_target: float | None = None,
        progress: bool = True) -> FitReport:
    """Train ``model`` on the normal images of ``train_loader``; return timing, losses and memory.

    ``validate`` (optional) returns a validation image AUROC; with ``validate_every`` it is called
    every that many epochs and drives early stopping. Without it, early stopping watches the
    epoch's mean training loss.
    """
    device = context.device
    model.to(device)
    report = FitReport()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model.setup_fit(context)

    if model.learns_by == "one_pass":
        _collect_pass(model, train_loader, device, progress, desc="collect")
        report.epochs_run = 1
    else:
        _gradient_epochs(model, train_loader, device, report, num_epochs=num_epochs, max_steps=max_steps,
                         amp=amp and device.type == "cuda", validate=validate, validate_every=validate_every,
                         stopper=_EarlyStopping(early_stopping_patience, early_stopping_target,
                                                higher_is_better=validate is not None and bool(validate_every)),
                         progress=progress)
        if model.post_fit_pass:
            _collect_pass(model, train_loader, device, progress, desc="post-fit pass")
    model.eval()
    with torch.no_grad():
        model.finalize()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        report.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    report.fit_seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _collect_pass(model: AnomalyModel, loader: DataLoader, device: torch.device, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            model.collect(batch["image"].to(device, non_blocking=True))


def _gradient_epochs(model, loader, device, report: FitReport, *, num_epochs, max_steps, amp, validate,
                     validate_every, stopper: _EarlyStopping, progress: bool) -> None:
    from tqdm.auto import tqdm

    optimizers = model.configure_optimizers()
    schedulers = model.configure_schedulers(optimizers)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    epochs = num_epochs if max_steps is None else math.ceil(max_steps / max(len(loader), 1))
    bar = tqdm(total=epochs * len(loader) if max_steps is None else max_steps, disable=not progress,
               desc=f"train {type(model).__name__}", leave=False)
    for epoch in range(epochs):
        model.train()
        losses = []
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=amp):
                if model.manual_optimization:
                    loss = _loss_value(model.training_step(images, optimizers))
                else:
                    loss = _loss_value(model.training_step(images))
            if not model.manual_optimization:
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
            losses.append(float(loss.detach()))
            report.steps += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4g}")
            if max_steps is not None and report.steps >= max_steps:
                break
        for scheduler in schedulers:
            scheduler.step()
        model.on_epoch_end(epoch)
        report.epochs_run = epoch + 1
        report.loss_history.append(float(np.mean(losses)) if losses else float("nan"))
        reason = _check_stop(model, report, stopper, epoch, validate, validate_every)
        if max_steps is not None and report.steps >= max_steps:
            reason = reason or f"reached max_steps={max_steps}"
            break
        if reason:
            report.stopped_early, report.stop_reason = True, reason
            log.info("early stopping after epoch %d: %s", epoch + 1, reason)
            break
    bar.close()


def _check_stop(model, report: FitReport, stopper: _EarlyStopping, epoch: int, validate, validate_every) -> str:
    if validate is not None and validate_every and (epoch + 1) % validate_every == 0:
        auroc = validate(model)
        if auroc is None:
            return ""
        report.val_history.append(float(auroc))
        return stopper.update(float(auroc))
    if validate is None and (stopper.patience is not None or stopper.target is not None):
        return stopper.update(report.loss_history[-1])
    return ""
