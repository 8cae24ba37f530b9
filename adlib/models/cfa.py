"""CFA: coupled-hypersphere-based feature adaptation.

Lee, Lee, Song, "CFA: Coupled-Hypersphere-Based Feature Adaptation for Target-Oriented Anomaly
Localization", IEEE Access 10 (2022), arXiv:2206.04325.

Features of a frozen CNN (``layers``), each averaged over its 3x3 neighbourhood, are brought to
the first layer's grid (bilinear) and concatenated; a trainable 1x1 CoordConv patch descriptor maps
them to ``dim // gamma_d`` channels. Before training, a pass over the training images builds the
memory bank: the mean descriptor output at every grid position (``gamma_c > 1`` compresses these
``h * w`` vectors to ``h * w // gamma_c`` k-means centres). Training adapts the descriptor with
the soft-boundary coupled-hypersphere loss: each patch is pulled inside radius ``r`` of its
``num_nearest`` nearest memory items and pushed at least ``margin`` beyond ``r`` from the next
``num_hard_negatives`` (hard negatives), both hinge terms scaled by ``1 / nu``.

Anomaly map: each patch's Euclidean distance to its nearest memory item, weighted by its softmin
weight among the ``num_nearest`` nearest, upsampled (bilinear) to the input size and smoothed with a
Gaussian of sigma ``blur_sigma``; the image score is the map's maximum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, DataPass, Step, TrainBatch
from adlib.models.components.coordconv import CoordConv2d
from adlib.models.components.features import local_patch_average
from adlib.models.components.kmeans import kmeans, squared_distances
from adlib.models.components.maps import gaussian_blur2d, max_score, upsample_map
from adlib.models.registry import ModelSpec, TrainDefaults, register


class Cfa(AnomalyModel):
    frozen_modules = ("extractor",)
    data_passes = (DataPass("memory", "before", "train"),)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 gamma_c: int = 1, gamma_d: int = 1, num_nearest: int = 3, num_hard_negatives: int = 3,
                 radius: float = 1e-5, nu: float = 1e-3, margin: float = 0.1, blur_sigma: float = 4.0,
                 lr: float = 1e-3, weight_decay: float = 5e-4, amsgrad: bool = True, *, normalize: bool = True,
                 pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        for key, value in (("gamma_c", gamma_c), ("gamma_d", gamma_d), ("num_nearest", num_nearest)):
            if int(value) < 1:
                raise ValueError(f"CFA's {key} must be a positive integer; got {value}")
        if int(num_hard_negatives) < 0:
            raise ValueError(f"CFA's num_hard_negatives must be >= 0; got {num_hard_negatives}")
        super().__init__(normalize=normalize)
        self.extractor = FeatureExtractor(backbone, list(layers), pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        dim = sum(self.extractor.channels)
        if dim // int(gamma_d) < 1:
            raise ValueError(f"gamma_d={gamma_d} leaves no descriptor channels ({dim} backbone channels)")
        self.descriptor = CoordConv2d(dim, dim // int(gamma_d), 1)
        self.radius = nn.Parameter(torch.tensor(float(radius)))
        self.register_buffer("memory", torch.empty(0, dim // int(gamma_d)))
        self.gamma_c, self.k, self.j = int(gamma_c), int(num_nearest), int(num_hard_negatives)
        self.nu, self.margin, self.blur_sigma = float(nu), float(margin), float(blur_sigma)
        self.lr, self.weight_decay, self.amsgrad = float(lr), float(weight_decay), bool(amsgrad)
        self._memory_sum: torch.Tensor | None = None
        self._memory_count = 0

    # ----- features ----------------------------------------------------------------------------
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """Patch descriptors ``[B, D, h, w]`` on the first layer's grid."""
        feats = [local_patch_average(f.float(), 3) for f in self.extractor(self.normalize_input(images))]
        size = feats[0].shape[-2:]
        feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                 for f in feats]
        return self.descriptor(torch.cat(feats, dim=1))

    def _memory_distances(self, phi: torch.Tensor) -> torch.Tensor:
        """Squared distances ``[B * h * w, M]`` of every patch to every memory item."""
        if self.memory.shape[0] == 0:
            raise RuntimeError("CFA's memory bank is empty: it is built by the 'memory' pass over the training "
                               "images before training (train through adlib.training.fit)")
        rows = phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1])
        return squared_distances(rows, self.memory)

    # ----- memory bank (the pass before training) ------------------------------------------------
    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        phi = self.describe(batch.images)
        total = phi.sum(dim=0)
        self._memory_sum = total if self._memory_sum is None else self._memory_sum + total
        self._memory_count += phi.shape[0]

    def end_pass(self, pass_name: str) -> None:
        mean = self._memory_sum / max(self._memory_count, 1)  # [D, h, w]
        self._memory_sum, self._memory_count = None, 0
        items = mean.flatten(1).T.contiguous()  # [h * w, D]
        if self.gamma_c > 1:
            seed = self.fit_context.seed if self.fit_context is not None else 0
            items = kmeans(items, max(items.shape[0] // self.gamma_c, 1), seed=seed)
        self.memory = items.to(self.memory)

    # ----- training ------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [*self.descriptor.parameters(), self.radius]
        return [torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, amsgrad=self.amsgrad)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        phi = self.describe(batch.images)
        count = min(self.k + self.j, self.memory.shape[0])
        nearest = self._memory_distances(phi).topk(count, dim=1, largest=False).values  # [N, K + J]
        r2 = self.radius.square()
        attract = F.relu(nearest[:, :self.k] - r2).mean() / self.nu
        negatives = nearest[:, self.k:]
        repel = F.relu(r2 - negatives - self.margin).mean() / self.nu if negatives.numel() else attract * 0
        return {"loss": attract + repel, "attract": attract.detach(), "repel": repel.detach()}

    # ----- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        phi = self.describe(images)
        b, _, h, w = phi.shape
        count = min(self.k, self.memory.shape[0])
        nearest = self._memory_distances(phi).topk(count, dim=1, largest=False).values.sqrt()  # [N, K]
        weighted = F.softmin(nearest, dim=1)[:, 0] * nearest[:, 0]
        maps = upsample_map(weighted.view(b, h, w), images.shape[-2:])
        maps = gaussian_blur2d(maps, self.blur_sigma)
        return AnomalyOutput(scores=max_score(maps), maps=maps)


register(ModelSpec(
    name="cfa", cls=Cfa, family="feature_adaptation",
    paper="Lee, Lee, Song, CFA: Coupled-Hypersphere-Based Feature Adaptation for Target-Oriented Anomaly "
          "Localization, IEEE Access 2022, arXiv:2206.04325",
    train=TrainDefaults(num_epochs=30, batch_size=4, img_size=256, center_crop=224),
    description="Wide-ResNet-50-2 layers 1-3, CoordConv patch descriptor adapted by a coupled-hypersphere loss "
                "around a memory bank of per-position means"))
