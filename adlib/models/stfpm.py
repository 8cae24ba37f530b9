"""STFPM: Student-Teacher Feature Pyramid Matching for Anomaly Detection.

Wang, Han, Xu, Ye, BMVC 2021 (arXiv:2103.04257).

A frozen pretrained teacher and a randomly initialised student of the same architecture see
the same normal images; the student learns to reproduce the teacher's L2-normalised features
at several layers. Loss per layer: ``0.5 * |t_hat - s_hat|^2`` averaged over positions (and
images), summed over layers. At test time the per-layer maps of that quantity are upsampled to
the input size and multiplied; the image score is the map's maximum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, Step, TrainBatch
from adlib.models.components.init import reinitialize_
from adlib.models.components.maps import max_score, upsample_map
from adlib.models.registry import ModelSpec, TrainDefaults, register

#: seed of the student's random initialisation (the teacher's random init, when not
#: pretrained, uses another one, so the two never start identical)
STUDENT_SEED = 1


def feature_discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``0.5 * |t/|t| - s/|s||^2`` per position: ``[B, C, h, w]`` pair -> ``[B, h, w]``."""
    t = F.normalize(teacher.float(), dim=1)
    s = F.normalize(student.float(), dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1)


class Stfpm(AnomalyModel):
    learns_by = "gradient"
    frozen_modules = ("teacher",)

    def __init__(self, backbone: str = "resnet18", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 lr: float = 0.4, momentum: float = 0.9, weight_decay: float = 1e-4,
                 normalize: bool = True, checkpoint_student: bool = False, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        self.teacher = FeatureExtractor(backbone, layers, pretrained=pretrained, backbone_dir=backbone_dir)
        self.student = FeatureExtractor(backbone, layers, pretrained=False, frozen=False,
                                        checkpoint=checkpoint_student)
        reinitialize_(self.student, STUDENT_SEED)
        self.set_input_stats(self.teacher.mean, self.teacher.std)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = self.normalize_input(images)
        return self.teacher(x), self.student(x)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.student.parameters(), lr=self.lr, momentum=self.momentum,
                                weight_decay=self.weight_decay)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        teacher, student = self._features(batch.images)
        return sum(feature_discrepancy(t, s).mean() for t, s in zip(teacher, student))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        teacher, student = self._features(images)
        size = images.shape[-2:]
        maps = None
        for t, s in zip(teacher, student):
            layer_map = upsample_map(feature_discrepancy(t, s), size)
            maps = layer_map if maps is None else maps * layer_map
        return AnomalyOutput(scores=max_score(maps), maps=maps)


register(ModelSpec(
    name="stfpm", cls=Stfpm, family="distillation",
    paper="Wang et al., Student-Teacher Feature Pyramid Matching for Anomaly Detection, BMVC 2021, "
          "arXiv:2103.04257",
    # CPU: the student's saved activations for 8 images at a time, not 32 (docs/models.md, Memory)
    train=TrainDefaults(num_epochs=100, batch_size=32, img_size=256, micro_batch_size=8),
    description="Student regresses a frozen teacher's normalised multi-scale features; product of discrepancy maps.",
))
