"""DFM: Deep Feature Modeling.

Ahuja et al., "Probabilistic Modeling of Deep Features for Out-of-Distribution and Adversarial
Detection" (2019), as adapted to anomaly detection in anomalib. A frozen CNN layer's feature map
is average-pooled (``pooling_kernel_size``) and flattened per image; a PCA keeping ``pca_level`` of
the variance models the normal class. Scores:

* ``"fre"``: feature reconstruction error, the squared distance between the pooled features and
  their projection onto the principal subspace (summed over all positions and channels);
* ``"nll"``: negative log-likelihood of the PCA coordinates under the Gaussian the PCA implies
  (diagonal covariance = explained variances).

The anomaly map is always the spatial feature reconstruction error (summed over channels)
upsampled bilinearly to the input size.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, TrainBatch
from adlib.models.components.maps import upsample_map
from adlib.models.components.pca import PCA
from adlib.models.registry import ModelSpec, TrainDefaults, register

SCORE_TYPES = ("fre", "nll")


class Dfm(AnomalyModel):
    learns_by = "one_pass"
    frozen_modules = ("extractor",)

    def __init__(self, backbone: str = "resnet50", layer: str = "layer3", pooling_kernel_size: int = 4,
                 pca_level: float = 0.97, score_type: str = "fre", *, normalize: bool = True,
                 pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        if score_type not in SCORE_TYPES:
            raise ValueError(f"score_type must be one of {SCORE_TYPES}; got {score_type!r}")
        super().__init__(normalize=normalize)
        self.extractor = FeatureExtractor(backbone, [layer], pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.pooling_kernel_size = int(pooling_kernel_size)
        self.score_type = score_type
        self.pca = PCA(float(pca_level) if pca_level <= 1 else int(pca_level))
        self._collected: list[torch.Tensor] = []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled layer features ``[B, C, h, w]``."""
        feat = self.extractor(self.normalize_input(images))[0].float()
        k = self.pooling_kernel_size
        if k > min(feat.shape[-2:]):
            raise ValueError(f"DFM's pooling_kernel_size={k} exceeds the {feat.shape[-2]}x{feat.shape[-1]} feature "
                             f"map of {images.shape[-2]}x{images.shape[-1]} images: use larger images or a smaller "
                             "pooling_kernel_size")
        if k > 1:
            feat = F.avg_pool2d(feat, k)
        return feat

    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        self._collected.append(self.features(batch.images).flatten(1).cpu())

    def finalize(self) -> None:
        if not self._collected:
            raise RuntimeError("DFM saw no training images: collect() was never called before finalize()")
        feats = torch.cat(self._collected)
        self._collected = []
        device = self.pca.mean.device
        self.pca.fit(feats).to(device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        feat = self.features(images)
        flat = feat.flatten(1)
        coords = self.pca.transform(flat)
        error = (flat - self.pca.inverse_transform(coords)).square()
        if self.score_type == "fre":
            scores = error.sum(dim=1)
        else:
            var = self.pca.explained_variance.clamp_min(1e-12)
            scores = 0.5 * (coords.square() / var).sum(dim=1) + 0.5 * (torch.log(var).sum()
                                                                        + var.numel() * math.log(2 * math.pi))
        maps = upsample_map(error.view_as(feat).sum(dim=1), images.shape[-2:])
        return AnomalyOutput(scores=scores, maps=maps)


register(ModelSpec(
    name="dfm", cls=Dfm, family="feature_adaptation",
    paper="Ahuja et al., Probabilistic Modeling of Deep Features for Out-of-Distribution and Adversarial "
          "Detection, arXiv:1909.11786 (2019)",
    train=TrainDefaults(num_epochs=1, batch_size=32, img_size=256),
    description="PCA of pooled CNN features; feature reconstruction error (or NLL) scores and maps"))
