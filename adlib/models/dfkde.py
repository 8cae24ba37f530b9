"""DFKDE: Deep Feature Kernel Density Estimation (image-level only).

Method (anomalib's DFKDE, 2022; KDE after Scott 1992): globally average-pooled features of a
frozen pretrained CNN, reduced by PCA, rescaled, and modelled by a Gaussian kernel density
estimate over the normal training images. The anomaly score of an image is the negative log
density of its feature vector (anomalib additionally squashes it through a fixed logistic; we
keep the raw value, which ranks images identically and does not saturate).

DFKDE has no spatial output: ``produces_maps`` is False and :meth:`predict` returns ``maps=None``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, TrainBatch
from adlib.models.components.kde import GaussianKDE
from adlib.models.components.pca import PCA
from adlib.models.registry import ModelSpec, TrainDefaults, register

FEATURE_SCALINGS = ("scale", "norm", "none")


class Dfkde(AnomalyModel):
    learns_by = "one_pass"
    produces_maps = False
    frozen_modules = ("extractor",)

    def __init__(self, backbone: str = "resnet18", layers: Sequence[str] = ("layer4",), n_pca_components: int = 16,
                 feature_scaling: str = "scale", max_training_points: int = 40000, *, normalize: bool = True,
                 pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        if feature_scaling not in FEATURE_SCALINGS:
            raise ValueError(f"feature_scaling must be one of {FEATURE_SCALINGS}; got {feature_scaling!r}")
        super().__init__(normalize=normalize)
        self.extractor = FeatureExtractor(backbone, list(layers), pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.feature_scaling = feature_scaling
        self.max_training_points = int(max_training_points)
        self.pca = PCA(int(n_pca_components))
        self.kde = GaussianKDE()
        self.register_buffer("max_length", torch.ones(()))
        self._collected: list[torch.Tensor] = []

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated globally average-pooled layer features, ``[B, sum(C)]``."""
        feats = self.extractor(self.normalize_input(images))
        return torch.cat([F.adaptive_avg_pool2d(f.float(), 1).flatten(1) for f in feats], dim=1)

    def _scale(self, coords: torch.Tensor) -> torch.Tensor:
        if self.feature_scaling == "scale":
            return coords / self.max_length
        if self.feature_scaling == "norm":
            return coords / coords.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return coords

    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        self._collected.append(self.embed(batch.images).cpu())

    def finalize(self) -> None:
        if not self._collected:
            raise RuntimeError("DFKDE saw no training images: collect() was never called before finalize()")
        feats = torch.cat(self._collected)
        self._collected = []
        if feats.shape[0] < 3:
            raise ValueError(f"DFKDE needs at least 3 training images to fit a density; got {feats.shape[0]}")
        if feats.shape[0] > self.max_training_points:
            seed = self.fit_context.seed if self.fit_context is not None else 0
            pick = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))
            feats = feats[pick[: self.max_training_points]]
        device = self.max_length.device
        coords = self.pca.fit(feats).transform(feats)
        self.max_length = coords.norm(dim=1).max().clamp_min(1e-12).to(device)
        self.kde.fit(self._scale(coords))
        self.pca.to(device)
        self.kde.to(device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        coords = self.pca.transform(self.embed(images))
        return AnomalyOutput(scores=-self.kde.log_density(self._scale(coords)), maps=None)


register(ModelSpec(
    name="dfkde", cls=Dfkde, family="memory",
    paper="DFKDE: Deep Feature Kernel Density Estimation (anomalib, 2022); "
          "Scott, Multivariate Density Estimation (1992)",
    train=TrainDefaults(num_epochs=1, batch_size=32, img_size=256),
    description="pooled CNN features -> PCA -> Gaussian KDE; image-level score only (no anomaly map)"))
