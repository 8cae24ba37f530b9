"""PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization.

Defard, Setkov, Loesch, Audigier, ICPR 2020 workshops (arXiv:2011.08785).

Every position of a multi-layer feature embedding (layer1..layer3, deeper maps upsampled to
layer1's grid, then a random subset of channels) gets a Gaussian fitted on the normal training
images. The anomaly map is the Mahalanobis distance to the position's Gaussian, upsampled to
the input size and smoothed (sigma 4); the image score is its maximum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, FitContext, TrainBatch
from adlib.models.components.features import finest_grid, position_major_embedding
from adlib.models.components.gaussian import PositionGaussianAccumulator, mahalanobis
from adlib.models.components.maps import gaussian_blur2d, max_score, upsample_map
from adlib.models.registry import ModelSpec, TrainDefaults, register


def random_channel_subset(total: int, count: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` of ``total`` channels, drawn with ``seed`` (all when ``count``
    is ``None`` or equals ``total``)."""
    if count is None or count == total:
        return torch.arange(total)
    if not 1 <= count <= total:
        raise ValueError(f"n_features={count} is impossible: the chosen layers have {total} channels; use 1 to "
                         f"{total}, or null for all of them")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:count].sort().values


class Padim(AnomalyModel):
    learns_by = "one_pass"
    frozen_modules = ("feature_extractor",)

    def __init__(self, backbone: str = "resnet18", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 n_features: int | None = 100, covariance_eps: float = 0.01, blur_sigma: float = 4.0,
                 normalize: bool = True, pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.feature_extractor.mean, self.feature_extractor.std)
        self.n_features = n_features
        self.covariance_eps = float(covariance_eps)
        self.blur_sigma = float(blur_sigma)
        total = sum(self.feature_extractor.channels)
        index = random_channel_subset(total, n_features, seed=0)
        dim = index.numel()
        self.register_buffer("feature_index", index)
        self.register_buffer("gaussian_mean", torch.empty(0, dim))
        self.register_buffer("inv_covariance", torch.empty(0, dim, dim))
        self._stats: PositionGaussianAccumulator | None = None

    def setup_fit(self, context: FitContext) -> None:
        """Draw the channel subset from the run's seed (it is saved with the model)."""
        super().setup_fit(context)
        total = sum(self.feature_extractor.channels)
        index = random_channel_subset(total, self.n_features, seed=context.seed)
        self.feature_index.copy_(index.to(self.feature_index.device))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Position-major ``[h * w, B, D]`` embedding (layers on the finest grid, the chosen
        channels) and the grid size ``(h, w)``."""
        maps = [m.float() for m in self.feature_extractor(self.normalize_input(images))]
        return position_major_embedding(maps, channels=self.feature_index), finest_grid(maps)

    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        if self._stats is None:
            self._stats = PositionGaussianAccumulator()
        self._stats.add(self.embed(batch.images)[0])

    def finalize(self) -> None:
        if self._stats is None or self._stats.count == 0:
            raise ValueError("PaDiM: no training images were collected before finalize()")
        self.gaussian_mean = self._stats.mean()
        self.inv_covariance = self._stats.inverse_covariance(self.covariance_eps)
        self._stats = None

    def distance_map(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances on the feature grid, ``[B, h, w]`` (before upsampling and blur)."""
        if self.gaussian_mean.shape[0] == 0:
            raise RuntimeError("PaDiM is not fitted: run collect() on training images and finalize() first")
        emb, (h, w) = self.embed(images)
        if h * w != self.gaussian_mean.shape[0]:
            raise ValueError(f"PaDiM was fitted on a grid of {self.gaussian_mean.shape[0]} positions but these "
                             f"images give {h}x{w}: predict at the training image size")
        return mahalanobis(emb, self.gaussian_mean, self.inv_covariance).reshape(emb.shape[1], h, w)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        maps = upsample_map(self.distance_map(images), images.shape[-2:])
        maps = gaussian_blur2d(maps, self.blur_sigma)
        return AnomalyOutput(scores=max_score(maps), maps=maps)


register(ModelSpec(
    name="padim", cls=Padim, family="memory",
    paper="Defard et al., PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and "
          "Localization, ICPR 2020 Workshops, arXiv:2011.08785",
    train=TrainDefaults(num_epochs=1, batch_size=32, img_size=256),
    description="Per-position Gaussian of random-subset multi-layer features; Mahalanobis map.",
))
