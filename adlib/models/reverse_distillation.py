"""Reverse Distillation (RD4AD): a student decoder reproduces a frozen teacher from a one-class embedding.

Deng and Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022
(arXiv:2201.10703).

The frozen teacher encoder (Wide-ResNet-50-2 layer1..layer3) gives three feature maps; the
trainable one-class bottleneck (OCBE) fuses them into a compact embedding, from which the
trainable reverse decoder reconstructs all three (:mod:`adlib.models.components.reverse_distillation`).
Loss per image: ``sum_levels 1 - cos(flatten(teacher), flatten(student))`` (one cosine over
the whole map of a level), averaged over the batch. Anomaly map: the per-position ``1 - cos``
of every level, upsampled to the input size and summed, then Gaussian-smoothed (sigma 4); the
image score is the map's maximum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, Step, TrainBatch
from adlib.models.components.maps import gaussian_blur2d, max_score, upsample_map
from adlib.models.components.reverse_distillation import (OneClassBottleneck, ReverseDecoder, check_pyramid,
                                                          cosine_distance_map)
from adlib.models.registry import ModelSpec, TrainDefaults, register


def flattened_cosine_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_levels mean_batch(1 - cos(flatten(t), flatten(s)))``: the paper's loss."""
    return sum((1.0 - F.cosine_similarity(t.flatten(1).float(), s.flatten(1).float(), dim=1)).mean()
               for t, s in zip(teacher, student))


def summed_distance_maps(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                         size: Sequence[int]) -> torch.Tensor:
    """Per-level ``1 - cos`` maps, bilinearly upsampled to ``size`` and summed: ``[B, H, W]``."""
    return sum(upsample_map(cosine_distance_map(t, s), size) for t, s in zip(teacher, student))


class ReverseDistillation(AnomalyModel):
    frozen_modules = ("teacher",)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 width_ratio: float = 0.5, bottleneck_blocks: int = 3, decoder_blocks: Sequence[int] = (3, 4, 6),
                 lr: float = 0.005, betas: Sequence[float] = (0.5, 0.999), blur_sigma: float = 4.0, *,
                 normalize: bool = True, pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        self.teacher = FeatureExtractor(backbone, list(layers), pretrained=pretrained, backbone_dir=backbone_dir)
        check_pyramid(layers, self.teacher.reductions, "Reverse Distillation")
        self.set_input_stats(self.teacher.mean, self.teacher.std)
        channels = self.teacher.channels
        self.bottleneck = OneClassBottleneck(channels, blocks=int(bottleneck_blocks), width_ratio=float(width_ratio))
        self.decoder = ReverseDecoder(channels, self.bottleneck.out_channels, blocks=list(decoder_blocks),
                                      width_ratio=float(width_ratio))
        #: the embedding sits one stride below the deepest teacher layer, and must upsample back exactly
        self.size_multiple = 2 * self.teacher.reductions[-1]
        self.lr, self.betas, self.blur_sigma = float(lr), tuple(float(b) for b in betas), float(blur_sigma)

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher maps, student reconstructions), shallow to deep."""
        teacher = self.teacher(self.normalize_input(images))
        return teacher, self.decoder(self.bottleneck(teacher))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [*self.bottleneck.parameters(), *self.decoder.parameters()]
        return [torch.optim.Adam(params, lr=self.lr, betas=self.betas)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        return flattened_cosine_loss(*self.features(batch.images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        self.check_input_size(images)
        maps = gaussian_blur2d(summed_distance_maps(*self.features(images), images.shape[-2:]), self.blur_sigma)
        return AnomalyOutput(scores=max_score(maps), maps=maps)


register(ModelSpec(
    name="reverse_distillation", cls=ReverseDistillation, family="distillation",
    paper="Deng and Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022, "
          "arXiv:2201.10703",
    train=TrainDefaults(num_epochs=200, batch_size=16, img_size=256),
    description="Frozen WRN50 teacher (layers 1-3), trainable one-class bottleneck and reverse decoder; "
                "summed 1 - cos maps",
    aliases=("rd4ad",)))
