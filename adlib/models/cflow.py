"""CFlow: conditional normalising flows on the feature vectors of a frozen CNN.

Gudovskiy, Ishizaka, Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022 (arXiv:2107.12571).

For every chosen layer, each position's feature vector (a "fiber", ``C`` values) gets a 2-D
sin/cos positional encoding (``condition_dims`` values) and goes through that layer's flow of
conditional coupling blocks. Training maximises the per-dimension log-likelihood
``log p / C`` of shuffled fiber mini-batches (loss ``-log sigmoid(log p / C)``), one optimiser
step per ``fiber_batch_size`` fibers: many steps per image batch, taken through the Stepper
(``manual_optimization``). Learning rate: linear warm-up from ``lr / 10`` over the first
``warmup_fraction`` of the optimiser steps, then cosine decay to ``lr * min_lr_factor``.

Map: per layer ``exp(log p / C - M_l)``, upsampled, summed over layers; the map is
``L - sum`` (``L`` layers), the score its maximum. ``M_l`` is the largest per-dimension
log-likelihood of layer ``l`` over the training images, measured once after training (the
"likelihood_max" data pass) and saved: the reference code subtracts the maximum over the
evaluated set instead, which makes an image's score depend on the other images scored with it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, DataPass, OptimizerSpec, Step, TrainBatch
from adlib.models.components.flow import check_finite_likelihood, conditional_fiber_flow, log_likelihood_per_dim
from adlib.models.components.maps import max_score, upsample_map
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant

#: fibers per flow call at prediction (bounds memory; every fiber is scored on its own)
PREDICT_CHUNK = 16384


def positional_encoding_2d(dims: int, height: int, width: int) -> torch.Tensor:
    """``[dims, height, width]`` sin/cos encoding: the first half of the channels encodes the
    column, the second half the row, at geometrically spaced frequencies."""
    if dims % 4:
        raise ValueError(f"condition_dims must be a multiple of 4 (sin and cos for rows and columns); got {dims}")
    quarter = dims // 4
    freqs = torch.exp(-math.log(1e4) * torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(length: int) -> torch.Tensor:  # [2 * quarter, length]
        angles = freqs[:, None] * torch.arange(length, dtype=torch.float32)[None]
        return torch.stack([angles.sin(), angles.cos()], dim=1).reshape(2 * quarter, length)

    cols = encode(width)[:, None, :].expand(-1, height, -1)
    rows = encode(height)[:, :, None].expand(-1, -1, width)
    return torch.cat([cols, rows], dim=0)


def fiber_batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive ``size``-long slices of ``order``; the remainder is dropped (the order is
    reshuffled every batch), and everything is one batch when there are fewer than ``size``."""
    if len(order) <= size:
        return [order]
    return list(order[: len(order) // size * size].split(size))


class Cflow(AnomalyModel):
    manual_optimization = True
    frozen_modules = ("extractor",)
    data_passes = (DataPass("likelihood_max", "after", "train"),)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer2", "layer3", "layer4"),
                 coupling_blocks: int = 8, condition_dims: int = 128, clamp: float = 1.9,
                 fiber_batch_size: int = 256, permute_soft: bool = False, lr: float = 2e-4,
                 warmup_fraction: float = 0.08, min_lr_factor: float = 1e-3, *, normalize: bool = True,
                 pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        if not layers:
            raise ValueError("CFlow needs at least one layer in `layers`, e.g. ['layer2', 'layer3', 'layer4']")
        if fiber_batch_size < 1:
            raise ValueError(f"fiber_batch_size must be >= 1; got {fiber_batch_size}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1); got {warmup_fraction}")
        positional_encoding_2d(condition_dims, 1, 1)  # checks condition_dims before the backbone is built
        self.extractor = FeatureExtractor(backbone, list(layers), pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.layers = list(layers)
        self.condition_dims = int(condition_dims)
        self.flows = nn.ModuleList(
            conditional_fiber_flow(c, self.condition_dims, int(coupling_blocks), clamp=clamp,
                                   permute_soft=permute_soft)
            for c in self.extractor.channels)
        self.fiber_batch_size = int(fiber_batch_size)
        self.lr, self.warmup_fraction, self.min_lr_factor = float(lr), float(warmup_fraction), float(min_lr_factor)
        #: largest per-dimension log-likelihood of each layer over the training images
        self.register_buffer("likelihood_max", torch.zeros(len(self.layers)))
        self._maxima: list[torch.Tensor] = []
        self._steps_per_batch: int | None = None
        self._generator = torch.Generator().manual_seed(0)

    # ----- features and likelihoods ------------------------------------------------------
    def fibers(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per layer: fibers ``[B*h*w, C]``, their conditions ``[B*h*w, P]`` and the grid ``(h, w)``."""
        out = []
        for fmap in self.extractor(self.normalize_input(images)):
            b, c, h, w = fmap.shape
            cond = positional_encoding_2d(self.condition_dims, h, w).to(fmap.device)
            out.append((fmap.float().permute(0, 2, 3, 1).reshape(-1, c),
                        cond.permute(1, 2, 0).reshape(1, h * w, -1).expand(b, -1, -1).reshape(b * h * w, -1),
                        (h, w)))
        return out

    def log_likelihood(self, layer: int, fibers: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood ``[N]`` of fibers under layer ``layer``'s flow."""
        z, log_jac = self.flows[layer](fibers, c=[cond])
        values = log_likelihood_per_dim(z, log_jac)
        check_finite_likelihood(values, f"CFlow {self.layers[layer]}", self.lr)
        return values

    def _chunked_log_likelihood(self, layer: int, fibers: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.log_likelihood(layer, f, c)
                          for f, c in zip(fibers.split(PREDICT_CHUNK), cond.split(PREDICT_CHUNK))])

    # ----- training ----------------------------------------------------------------------
    def setup_fit(self, context) -> None:
        super().setup_fit(context)
        self._generator = torch.Generator().manual_seed(int(context.seed))
        self._steps_per_batch = None

    def lr_factor(self, progress: float) -> float:
        """Multiplier of ``lr`` at ``progress`` (fraction of the optimiser steps done)."""
        floor = self.min_lr_factor
        cosine = lambda p: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))  # noqa: E731
        if progress < self.warmup_fraction:
            return 0.1 + (progress / self.warmup_fraction) * (cosine(self.warmup_fraction) - 0.1)
        return cosine(min(progress, 1.0))

    def configure_optimizers(self) -> list[OptimizerSpec]:
        optimizer = torch.optim.Adam(self.flows.parameters(), lr=self.lr)
        total_batches = self.fit_context.total_steps if self.fit_context is not None else 1

        def factor(optimizer_steps: int) -> float:  # fiber steps per image batch are counted on the first batch
            total = max(total_batches * (self._steps_per_batch or 1), 1)
            return self.lr_factor(optimizer_steps / total)

        return [OptimizerSpec(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), interval="step")]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        if stepper is None:
            raise RuntimeError("CFlow steps its optimiser itself (manual_optimization): train it through "
                               "adlib.training.fit, which hands training_step a Stepper")
        with torch.no_grad():
            layers = self.fibers(batch.images)
        plans = []
        for fibers, cond, _ in layers:
            order = torch.randperm(len(fibers), generator=self._generator).to(fibers.device)
            plans.append(fiber_batches(order, self.fiber_batch_size))
        if self._steps_per_batch is None:
            self._steps_per_batch = sum(len(p) for p in plans)
        losses = []
        for layer, ((fibers, cond, _), plan) in enumerate(zip(layers, plans)):
            for index in plan:
                loss = -F.logsigmoid(self.log_likelihood(layer, fibers[index], cond[index])).mean()
                stepper.step(loss)
                losses.append(loss.detach())
        return {"loss": torch.stack(losses).mean()}

    def collect(self, batch: TrainBatch, pass_name: str) -> None:  # the "likelihood_max" pass
        maxima = [self._chunked_log_likelihood(layer, fibers, cond).max()
                  for layer, (fibers, cond, _) in enumerate(self.fibers(batch.images))]
        self._maxima.append(torch.stack(maxima))

    def end_pass(self, pass_name: str) -> None:
        self.likelihood_max = torch.stack(self._maxima).amax(dim=0)
        self._maxima = []

    # ----- prediction --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        size, b = images.shape[-2:], images.shape[0]
        total = torch.zeros(b, *size, device=images.device)
        for layer, (fibers, cond, (h, w)) in enumerate(self.fibers(images)):
            log_p = self._chunked_log_likelihood(layer, fibers, cond) - self.likelihood_max[layer]
            total = total + upsample_map(torch.exp(log_p).view(b, h, w), size)
        maps = len(self.layers) - total
        return AnomalyOutput(scores=max_score(maps), maps=maps)


_PAPER = ("Gudovskiy et al., CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via "
          "Conditional Normalizing Flows, WACV 2022")
register(ModelSpec(
    name="cflow", cls=Cflow, family="flow", paper=_PAPER,
    train=TrainDefaults(num_epochs=200, batch_size=32, img_size=256, amp=False),
    description="Wide-ResNet-50-2 layers 2-4, one conditional flow of 8 couplings per layer on feature fibers",
    aliases=("cflow-wrn50",)))
register_variant("cflow-resnet18", base="cflow", model={"backbone": "resnet18"},
                 description="ResNet-18 layers 2-4, one conditional flow of 8 couplings per layer on feature fibers")
