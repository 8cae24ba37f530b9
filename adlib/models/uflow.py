"""U-Flow: a U-shaped normalising flow on multi-scale features, with an a-contrario threshold.

Tailanian, Pardo, Musé, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with
Unsupervised Threshold", arXiv:2211.12353 (2022).

Features: the paper's multi-scale CaiT ("MCaiT": the tokens of ``cait_m48_448`` after block 40
and of ``cait_s24_224`` on the image at half size after block 20, each through its backbone's
final LayerNorm, at strides 16 and 32), or a CNN's ``layers`` (each normalised by a LayerNorm
over ``(C, H, W)`` without learned parameters). Consecutive scales must halve.

The flow, coarsest scale first: a stage of ``flow_steps`` affine couplings (subnets alternating
3x3 and 1x1 convolutions); about half of its channels (a multiple of 4) are upsampled by
depth-to-space (invertible, log-det 0) and concatenated with the next finer features, the rest
leave as that scale's latents; the finest stage's output is the finest latents. Loss: the mean
over the batch of ``sum over latents of 0.5 * sum(z^2) - log|det J|``. Adam with ``LinearLR``
from 1 to ``lr_end_factor`` over the fit, stepped after every optimiser step.

Map: ``1 - mean over scales of exp(-0.5 * mean_c z^2)`` upsampled to the input size; score: its
maximum. Decision rule ``nfa`` (:mod:`adlib.models.components.nfa`): the image is anomalous
when some latent position has a number of false alarms <= 1; ``AnomalyOutput.decision`` is
``-min log10 NFA`` of the image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, OptimizerSpec, Step, TrainBatch
from adlib.models.components.features import image_pyramid
from adlib.models.components.flow import check_finite_likelihood, coupling_flow_2d, gaussian_nll, likelihood_map
from adlib.models.components.maps import max_score
from adlib.models.components.nfa import check_nfa_options, log10_nfa
from adlib.models.components.vit_features import VitBlockFeatures
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant


def upsampled_channels(channels: int) -> int:
    """Channels of a stage's output that go up to the next finer scale: about half, a multiple of 4."""
    return channels // 8 * 4


class UShapedFlow(nn.Module):
    """Flow stages from the coarsest scale up; ``forward(feats)`` (finest first) returns the latents
    (finest first) and the per-sample log-Jacobian ``[B]``."""

    def __init__(self, channels: Sequence[int], flow_steps: int, hidden_ratio: float, clamp: float) -> None:
        super().__init__()
        stages, carried = [], 0
        for k in reversed(range(len(channels))):  # coarsest first
            width = channels[k] + carried
            if k > 0 and upsampled_channels(width) < 4:
                raise ValueError(f"U-Flow needs at least 8 channels on every coarser scale; got {list(channels)}")
            stages.append(coupling_flow_2d(width, flow_steps, hidden_ratio=hidden_ratio, clamp=clamp))
            carried = upsampled_channels(width) // 4
        self.stages = nn.ModuleList(reversed(stages))  # finest first, as the features

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        latents: list[torch.Tensor] = []
        log_jac = torch.zeros(feats[0].shape[0], device=feats[0].device)
        x = feats[-1]
        for k in reversed(range(len(feats))):
            z, jac = self.stages[k](x)
            log_jac = log_jac + jac
            if k == 0:
                latents.insert(0, z)
                break
            up = upsampled_channels(z.shape[1])
            latents.insert(0, z[:, up:])
            x = torch.cat([feats[k - 1], F.pixel_shuffle(z[:, :up], 2)], dim=1)
        return latents, log_jac


class Uflow(AnomalyModel):
    frozen_modules = ("extractor", "coarse_extractor")
    decision_method = "nfa"

    def required_weights(self) -> tuple[str, ...]:
        model = self.config.model if self.config is not None else {}
        return tuple(name for name in (model.get("backbone"), model.get("coarse_backbone")) if name)

    def __init__(self, backbone: str = "cait_m48_448", vit_block: int | None = 40, layers: Sequence[str] = (),
                 coarse_backbone: str | None = "cait_s24_224", coarse_vit_block: int = 20,
                 backbone_kwargs: dict[str, Any] | None = None, coarse_backbone_kwargs: dict[str, Any] | None = None,
                 flow_steps: int = 4, hidden_ratio: float = 1.0, clamp: float = 2.0, lr: float = 1e-4,
                 weight_decay: float = 1e-5, lr_end_factor: float = 0.4, nfa_window: int = 7,
                 nfa_probability: float = 0.5, *, normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        check_nfa_options(int(nfa_window), float(nfa_probability))
        if (vit_block is None) == (not layers):
            raise ValueError("U-Flow takes either a transformer `vit_block` (layers=[]) or CNN `layers` "
                             "(vit_block=None), e.g. layers=['layer1', 'layer2', 'layer3']")
        if layers and coarse_backbone is not None:
            raise ValueError("coarse_backbone (the second transformer at half size) goes with vit_block; "
                             "set coarse_backbone=None for CNN `layers`")
        weights = {"pretrained": pretrained, "backbone_dir": backbone_dir}
        self.coarse_extractor = None
        if vit_block is not None:
            self.extractor = VitBlockFeatures(backbone, [vit_block], **weights, **(backbone_kwargs or {}))
            reductions = list(self.extractor.reductions)
            if coarse_backbone is not None:
                self.coarse_extractor = VitBlockFeatures(coarse_backbone, [coarse_vit_block], **weights,
                                                         **(coarse_backbone_kwargs or {}))
                self._check_coarse_backbone()
                reductions.append(2 * self.coarse_extractor.reductions[0])
        else:
            self.extractor = FeatureExtractor(backbone, list(layers), **weights, **(backbone_kwargs or {}))
            reductions = list(self.extractor.reductions)
        if any(b != 2 * a for a, b in zip(reductions, reductions[1:])):
            raise ValueError(f"U-Flow needs feature scales that halve from one to the next; {backbone} layers "
                             f"{list(layers) or [vit_block]} have strides {reductions}: choose consecutive layers, "
                             "e.g. layer1, layer2, layer3")
        self.size_multiple = reductions[-1]
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.is_vit = vit_block is not None
        channels = list(self.extractor.channels)
        if self.coarse_extractor is not None:
            channels.append(self.coarse_extractor.channels[0])
        self.flow = UShapedFlow(channels, int(flow_steps), float(hidden_ratio), float(clamp))
        self.lr, self.weight_decay, self.lr_end_factor = float(lr), float(weight_decay), float(lr_end_factor)
        self.nfa_window, self.nfa_probability = int(nfa_window), float(nfa_probability)

    def _check_coarse_backbone(self) -> None:
        if (self.coarse_extractor.mean, self.coarse_extractor.std) != (self.extractor.mean, self.extractor.std):
            raise ValueError(f"the two transformers expect differently normalised inputs ({self.extractor.name}, "
                             f"{self.coarse_extractor.name}); choose backbones with the same input statistics")
        fine, coarse = self.extractor.img_size, self.coarse_extractor.img_size
        if fine and coarse and tuple(2 * s for s in coarse) != tuple(fine):
            raise ValueError(f"the coarse transformer sees the image at half size, so it must be built for "
                             f"{fine[0] // 2} px (the first for {fine[0]} px); it is built for {coarse[0]} px: set "
                             f"coarse_backbone_kwargs={{'img_size': {fine[0] // 2}}}")

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.check_input_size(images)
        x = self.normalize_input(images)
        feats = [f.float() for f in self.extractor(x)]
        if self.coarse_extractor is not None:
            return feats + [self.coarse_extractor(image_pyramid(x, 2)[1])[0].float()]
        if self.is_vit:  # tokens passed the backbone's final LayerNorm already
            return feats
        return [F.layer_norm(f, f.shape[1:]) for f in feats]

    def latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.flow(self.features(images))

    def configure_optimizers(self) -> list[OptimizerSpec]:
        optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = self.fit_context.total_steps if self.fit_context is not None else 1
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=self.lr_end_factor,
                                                     total_iters=max(total - 1, 1))
        return [OptimizerSpec(optimizer, schedule, interval="step")]

    def nll(self, latents: list[torch.Tensor], log_jac: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood ``sum 0.5 * z^2 - log|det J|`` ``[B]`` (checked to be finite)."""
        values = gaussian_nll(latents, log_jac)
        check_finite_likelihood(-values, "U-Flow", self.lr)
        return values

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        return self.nll(*self.latents(batch.images)).mean()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        latents, log_jac = self.latents(images)
        self.nll(latents, log_jac)
        maps = likelihood_map(latents, images.shape[-2:])
        nfa = log10_nfa(latents, self.nfa_window, self.nfa_probability)
        return AnomalyOutput(scores=max_score(maps), maps=maps, decision=-nfa.flatten(1).amin(dim=1).float())


register(ModelSpec(
    name="uflow", cls=Uflow, family="flow",
    paper="Tailanian et al., U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with Unsupervised "
          "Threshold, arXiv:2211.12353 (2022)",
    train=TrainDefaults(num_epochs=200, batch_size=8, img_size=448, amp=False),
    description="CaiT-M48 block 40 + CaiT-S24 (half size) block 20, U-shaped flow of 4-step stages, NFA threshold",
    aliases=("uflow-mcait",)))
register_variant("uflow-resnet18", base="uflow",
                 model={"backbone": "resnet18", "vit_block": None, "layers": ["layer1", "layer2", "layer3"],
                        "coarse_backbone": None},
                 train={"img_size": 256},
                 description="ResNet-18 layers 1-3, U-shaped flow of 4-step stages, NFA threshold")
