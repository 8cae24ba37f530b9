"""The one training loop that drives every model through the contract in :mod:`adlib.models.base`.

``fit`` runs, in order: ``setup_fit``; the "before" data passes; the one pass (memory models)
or the gradient phases; the "after" data passes; ``finalize``. Every optimiser step of every
model, automatic or manual, goes through one :class:`Stepper`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
import resource
import time
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from adlib import memory_probe
from adlib.models.base import (AnomalyModel, DataPass, FitContext, OptimizerSpec, Step, TrainBatch,
                               check_phases)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or a weight) became NaN or infinite; training cannot continue meaningfully."""


@dataclasses.dataclass
class FitReport:
    fit_seconds: float = 0.0
    epochs_run: int = 0
    steps: int = 0
    total_steps: int = 0
    optimizer_steps: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)  # mean loss per epoch
    loss_terms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # every logged key, per epoch
    val_history: list[float] = dataclasses.field(default_factory=list)  # validation metric per check
    val_metric: str | None = None
    stopped_early: bool = False
    stop_reason: str = ""
    passes: dict[str, int] = dataclasses.field(default_factory=dict)  # data pass -> images seen
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    @property
    def final_loss(self) -> float | None:
        return self.loss_history[-1] if self.loss_history else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "final_loss": self.final_loss}


@dataclasses.dataclass(frozen=True)
class FitData:
    """The data of one fit: the training loader, the held-out validation loader (normal images
    carved from train, or None) and one endless iterator per declared auxiliary stream."""

    train: DataLoader
    validation: DataLoader | None = None
    aux: Mapping[str, Iterator[torch.Tensor]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Validator:
    """What early stopping watches: ``evaluate(model) -> value`` with its name and direction."""

    name: str
    evaluate: Callable[[AnomalyModel], float | None]
    higher_is_better: bool


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; a device that does not exist here is a
    ``ValueError`` saying what to use instead."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} asked for a GPU, but no CUDA GPU is visible to this process: use "
                             "device cpu (or auto, which picks a GPU when there is one)")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} does not exist: this process sees {count} GPU(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif resolved.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


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


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value.detach()).all():
        raise NonFiniteLossError(
            f"training {what} became {value.detach().float().mean().item()}: the run is stopped. Try a lower "
            "learning rate, mixed precision off (amp=False) or check the input data for constant images.")


def as_specs(optimizers: Iterable[OptimizerSpec | torch.optim.Optimizer]) -> list[OptimizerSpec]:
    """Bare optimisers become always-active specs on the ``"loss"`` key."""
    specs = [o if isinstance(o, OptimizerSpec) else OptimizerSpec(o) for o in optimizers]
    if not specs:
        raise ValueError("configure_optimizers() returned no optimiser")
    return specs


class Stepper:
    """Owns the AMP gradient scaler, unscale + gradient clipping, the NaN/inf check and the
    step-interval schedulers of a fit's optimisers.

    Automatic models are stepped by the loop; models with ``manual_optimization`` call
    :meth:`step` themselves as often as they need (it is correct under AMP on CUDA).
    """

    def __init__(self, specs: list[OptimizerSpec], *, amp: bool = False, grad_clip_norm: float | None = None,
                 device_type: str = "cpu") -> None:
        self.specs = specs
        self.scaler = torch.amp.GradScaler(device_type if device_type == "cuda" else "cpu", enabled=amp)
        self.grad_clip_norm = grad_clip_norm
        self.optimizer_steps = 0
        #: gradient norm (before clipping) of the last step of each optimiser
        self.last_grad_norm: dict[int, float] = {}

    def index(self, which: int | str) -> int:
        """An optimiser by position, or by the loss key its spec minimises."""
        if isinstance(which, int):
            return which
        for i, spec in enumerate(self.specs):
            if spec.loss == which:
                return i
        raise KeyError(f"no optimiser minimises {which!r}; loss keys: {[s.loss for s in self.specs]}")

    def active(self, phase: str) -> list[int]:
        return [i for i, s in enumerate(self.specs) if s.active_in(phase)]

    def step(self, loss: torch.Tensor, which: int | str = 0, *, retain_graph: bool = False,
             update: bool = True) -> None:
        """zero_grad -> scaled backward -> unscale -> clip -> optimiser step -> (scaler update) ->
        step-interval scheduler."""
        self.specs[self.index(which)].optimizer.zero_grad(set_to_none=True)
        self.backward(loss, which, retain_graph=retain_graph)
        self.apply(which, update=update)

    def backward(self, loss: torch.Tensor, which: int | str = 0, *, retain_graph: bool = False) -> None:
        """Add ``loss``'s (scaled) gradients to what the optimiser's parameters hold: once per
        micro-batch, then one :meth:`apply`."""
        _check_finite(loss, f"loss '{self.specs[self.index(which)].loss}'")
        self.scaler.scale(loss).backward(retain_graph=retain_graph)

    def apply(self, which: int | str = 0, *, update: bool = True) -> None:
        """Unscale -> clip -> optimiser step -> (scaler update) -> step-interval scheduler, on the
        gradients the backward passes left."""
        spec = self.specs[self.index(which)]
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(spec.optimizer)
            params = [p for group in spec.optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            self.last_grad_norm[self.index(which)] = float(norm)
        self.scaler.step(spec.optimizer)
        if update:
            self.scaler.update()
        if spec.scheduler is not None and spec.interval == "step":
            spec.scheduler.step()
        self.optimizer_steps += 1

    def end_epoch(self, phase: str) -> None:
        """Step the epoch-interval schedulers of the optimisers active in ``phase``."""
        for i in self.active(phase):
            spec = self.specs[i]
            if spec.scheduler is not None and spec.interval == "epoch":
                spec.scheduler.step()


class _EarlyStopping:
    """``patience`` checks without improvement, or a target value."""

    def __init__(self, patience: int | None, target: float | None, higher_is_better: bool) -> None:
        self.patience, self.target, self.higher = patience, target, higher_is_better
        self.best: float | None = None
        self.bad_checks = 0

    @property
    def active(self) -> bool:
        return self.patience is not None or self.target is not None

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


def schedule_length(steps_per_epoch: int, num_epochs: int | None, max_steps: int | None) -> tuple[int, int]:
    """(total steps, epochs) of a fit: whichever of the epoch and step budgets ends first."""
    if steps_per_epoch < 1:
        raise ValueError("the training loader is empty: there are no training batches (fewer images than "
                         "one batch with drop_last?)")
    budgets = [b for b in (None if num_epochs is None else num_epochs * steps_per_epoch, max_steps) if b is not None]
    if not budgets:
        raise ValueError("a gradient model needs num_epochs or max_steps (both are None)")
    total = min(budgets)
    if total < 1:
        raise ValueError(f"the training budget is {total} steps (num_epochs={num_epochs}, max_steps={max_steps}); "
                         "give a positive num_epochs or max_steps")
    return total, math.ceil(total / steps_per_epoch)


def phase_at(index: int, total: int, phases: tuple[tuple[str, float], ...]) -> str:
    """The phase active at step ``index`` of ``total``: phase k covers the steps from
    ``round(total * sum(fractions[:k]))`` up to the next boundary."""
    edge = 0.0
    for name, fraction in phases:
        edge += fraction
        if index < round(total * edge):
            return name
    return phases[-1][0]


def to_train_batch(batch: Mapping, device: torch.device, aux: Mapping[str, Iterator[torch.Tensor]]) -> TrainBatch:
    """A loader dict (``image``, ``label``, ``mask``) plus one batch of each stream, on ``device``."""
    images = batch["image"].to(device, non_blocking=True)
    labels = torch.as_tensor(batch["label"]).to(device)
    masks = batch.get("mask")
    masks = (masks.to(device, non_blocking=True) if masks is not None
             else torch.zeros(images.shape[0], 1, *images.shape[-2:], device=device))
    return TrainBatch(images, labels, masks, {name: next(it).to(device, non_blocking=True) for name, it in aux.items()})


def fit(model: AnomalyModel, data: FitData | DataLoader, context: FitContext, *,
        num_epochs: int | None = 1, max_steps: int | None = None, amp: bool = True,
        grad_clip_norm: float | None = None, validator: Validator | None = None, validate_every: int | None = None,
        early_stopping_patience: int | None = None, early_stopping_target: float | None = None,
        micro_batch_size: int | None = None, progress: bool = True) -> FitReport:
    """Train ``model``; return timing, losses and memory.

    ``context`` gives the device, seed and image size; the epochs and steps this fit runs are
    filled in here. ``validator`` (with ``validate_every``) drives early stopping; without it,
    early stopping watches the epoch's mean training loss. ``micro_batch_size`` (CPU only, like
    ``amp`` on CUDA only): see :func:`_micro_batch_step`.
    """
    data = data if isinstance(data, FitData) else FitData(train=data)
    device = context.device
    model.to(device)
    check_phases(model.phases, type(model).__name__)
    report = FitReport()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    steps_per_epoch = len(data.train)
    if model.learns_by == "one_pass":
        total, epochs = 0, 1
    else:
        total, epochs = schedule_length(steps_per_epoch, num_epochs, max_steps)
    context = dataclasses.replace(context, num_epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                                  num_train_images=len(data.train.dataset))
    report.total_steps = total
    model.setup_fit(context)
    with memory_probe.stage("features" if model.learns_by == "one_pass" else "training"):
        _data_passes(model, data, "before", device, report, progress)
        if model.learns_by == "one_pass":
            _run_pass(model, DataPass("fit", "before"), data.train, device, report, progress)
            report.epochs_run = 1
        else:
            stopper = _EarlyStopping(early_stopping_patience, early_stopping_target,
                                     higher_is_better=validator.higher_is_better if validator else False)
            _gradient_epochs(model, data, device, report, total=total, epochs=epochs,
                             amp=amp and device.type == "cuda", grad_clip_norm=grad_clip_norm, validator=validator,
                             validate_every=validate_every, stopper=stopper,
                             micro_batch_size=micro_batch_size if device.type == "cpu" else None, progress=progress)
            _check_weights(model)
        _data_passes(model, data, "after", device, report, progress)
    model.eval()
    with torch.no_grad(), memory_probe.stage("fitting"):
        model.finalize()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        report.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    report.fit_seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _data_passes(model: AnomalyModel, data: FitData, when: str, device, report: FitReport, progress: bool) -> None:
    for data_pass in model.data_passes:
        if data_pass.when != when:
            continue
        loader = data.train if data_pass.split == "train" else data.validation
        if loader is None:
            raise ValueError(f"{type(model).__name__}'s data pass {data_pass.name!r} needs the validation split, but "
                             "this run has none: set validation_fraction > 0 (normal training images held out)")
        _run_pass(model, data_pass, loader, device, report, progress)
        model.end_pass(data_pass.name)


def _run_pass(model: AnomalyModel, data_pass: DataPass, loader: DataLoader, device, report: FitReport,
              progress: bool) -> None:
    from tqdm.auto import tqdm

    model.eval()
    seen = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"{data_pass.name} pass", disable=not progress, leave=False):
            train_batch = to_train_batch(batch, device, {})
            model.collect(train_batch, data_pass.name)
            seen += len(train_batch)
    report.passes[data_pass.name] = seen


def _check_weights(model: AnomalyModel) -> None:
    """NaN weights are caught here, not at evaluation."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            raise NonFiniteLossError(f"weight {name} became NaN/inf during training: the run is stopped. Try a "
                                     "lower learning rate or mixed precision off (amp=False).")


def _gradient_epochs(model: AnomalyModel, data: FitData, device, report: FitReport, *, total: int, epochs: int,
                     amp: bool, grad_clip_norm: float | None, validator: Validator | None,
                     validate_every: int | None, stopper: _EarlyStopping, micro_batch_size: int | None,
                     progress: bool) -> None:
    from tqdm.auto import tqdm

    stepper = Stepper(as_specs(model.configure_optimizers()), amp=amp, grad_clip_norm=grad_clip_norm,
                      device_type=device.type)
    problem = micro_batch_size and micro_batch_problem(model, stepper.specs)
    if problem:
        raise ValueError(f"micro_batch_size: {problem}")
    bar = tqdm(total=total, disable=not progress, desc=f"train {type(model).__name__}", leave=False)
    index, phase = 0, phase_at(0, total, model.phases)
    for epoch in range(epochs):
        model.train()
        terms: dict[str, list[float]] = {}
        for batch in itertools.islice(data.train, total - index):
            phase = phase_at(index, total, model.phases)
            step = Step(index=index, epoch=epoch, total=total, phase=phase)
            train_batch = to_train_batch(batch, device, data.aux)
            split = bool(micro_batch_size) and len(stepper.active(phase)) == 1
            if split:
                out = _micro_batch_step(model, train_batch, step, stepper, micro_batch_size,
                                        lambda: torch.autocast(device_type=device.type, enabled=amp))
            else:
                with torch.autocast(device_type=device.type, enabled=amp):
                    out = model.training_step(train_batch, step, stepper if model.manual_optimization else None)
            out = out if isinstance(out, dict) else {"loss": out}
            if not model.manual_optimization and not split:
                active = stepper.active(phase)
                for position, i in enumerate(active):
                    last = position == len(active) - 1
                    stepper.step(out[stepper.specs[i].loss], i, retain_graph=not last, update=last)
            logged = {key: float(value.detach().float().mean()) for key, value in out.items()}
            for key, value in logged.items():
                terms.setdefault(key, []).append(value)
            index += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, phase=phase, loss=f"{logged.get('loss', float('nan')):.4g}")
        stepper.end_epoch(phase)
        model.on_epoch_end(epoch)
        report.epochs_run, report.steps = epoch + 1, index
        means = {key: float(np.mean(values)) for key, values in terms.items()}
        for key, value in means.items():
            report.loss_terms.setdefault(key, []).append(value)
        log.info("epoch %d/%d (step %d/%d, phase %s): %s", epoch + 1, epochs, index, total, phase,
                 ", ".join(f"{k} {v:.5g}" for k, v in means.items()) or "no batches")
        report.loss_history.append(means.get("loss", float(np.sum(list(means.values()))) if means else float("nan")))
        reason = _check_stop(model, report, stopper, epoch, validator, validate_every)
        if report.val_history and validator is not None and len(report.val_history) == len(report.loss_history):
            log.info("  validation %s: %.5g", validator.name, report.val_history[-1])
        if reason:
            report.stopped_early, report.stop_reason = True, reason
            log.info("early stopping after epoch %d: %s", epoch + 1, reason)
            break
        if index >= total:
            break
    if not report.stop_reason:
        report.stop_reason = f"completed {index} of {total} steps"
    report.optimizer_steps = stepper.optimizer_steps
    bar.close()


def micro_batch_problem(model: AnomalyModel, specs: list[OptimizerSpec]) -> str | None:
    """Why ``model`` cannot train in micro-batches (None: it can): they need one optimiser
    stepped per batch by the loop."""
    name = type(model).__name__
    if model.manual_optimization:
        return (f"{name} steps its optimisers itself, so the loop cannot cut its batches into micro-batches; "
                "drop micro_batch_size (or lower batch_size)")
    for phase, _ in model.phases:
        active = [s.loss for s in specs if s.active_in(phase)]
        if len(active) > 1:
            return (f"{name} steps {len(active)} optimisers on every batch ({', '.join(active)}), and "
                    "micro-batches accumulate the gradients of one; drop micro_batch_size (or lower batch_size)")
    return None


def _micro_batch_step(model: AnomalyModel, batch: TrainBatch, step: Step, stepper: Stepper, size: int,
                      autocast: Callable) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch`` cut into parts of ``size`` images, so that only one part's
    activations are alive at a time. Each part's loss, weighted by its share of the batch, adds
    its gradients, which is the whole batch's gradient for losses that are means over images;
    batch-norm layers in training mode see each part's statistics. Returns the batch's losses
    (the weighted sums, detached) for logging."""
    (which,) = stepper.active(step.phase)
    key = stepper.specs[which].loss
    stepper.specs[which].optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for part in batch.split(size):
        with autocast():
            out = model.training_step(part, step)
        out = out if isinstance(out, dict) else {"loss": out}
        share = len(part) / len(batch)
        stepper.backward(out[key] * share, which)
        for name, value in out.items():
            totals[name] = totals.get(name, 0.0) + share * value.detach().float().mean()
    stepper.apply(which)
    return totals


def _check_stop(model, report: FitReport, stopper: _EarlyStopping, epoch: int, validator: Validator | None,
                validate_every: int | None) -> str:
    if validator is not None and validate_every and (epoch + 1) % validate_every == 0:
        value = validator.evaluate(model)
        model.train()
        if value is None:
            return ""
        report.val_metric = validator.name
        report.val_history.append(float(value))
        return stopper.update(float(value)) if stopper.active else ""
    if validator is None and stopper.active:
        return stopper.update(report.loss_history[-1])
    return ""
