"""SuperSimpleNet: a segmentation and a classification head on adapted frozen CNN features, trained
on anomalies synthesised in feature space (and, supervised, on labelled anomalous images).

Rolih, Fučka, Skočaj, "SuperSimpleNet: Unifying Unsupervised and Supervised Learning for Fast and
Reliable Surface Defect Detection", ICPR 2024 (arXiv:2408.03143); extension "No Label Left Behind:
A Unified Surface Defect Detection Model for all Supervision Regimes", J. Intell. Manuf. 2025 (JIMS).

* Features: the frozen backbone's ``layers`` (WideResNet-50-2 layer2 + layer3), each resized
  bilinearly to twice the first layer's resolution, concatenated and averaged over 3x3
  neighbourhoods. A 1x1 convolution (the feature adaptor) maps them to the heads' input.
* Synthetic anomalies (training only): the batch is duplicated; inside binarised Perlin masks
  (Perlin noise in [-1, 1] above ``perlin_threshold``; half of the masks, drawn per image, are left
  empty) Gaussian noise (std ``noise_std``) is added to the adapted features, and, with the JIMS
  head (``adapt_cls_features=False``), the same noise to the raw features the classification
  head reads. Regions already marked anomalous in a labelled image get no noise; masks and
  labels are updated to include the synthetic regions.
* Segmentation head: 1x1 conv -> BatchNorm -> LeakyReLU(0.2) -> 1x1 conv: a logit map.
  Classification head: a 5x5 conv-BN-ReLU on [features, map], its global max and mean, with the
  map's max and mean, into a linear layer: an image logit. ``stop_grad`` (unsupervised) keeps
  the classification loss from changing the map.
* Loss: focal loss (gamma 4) on the map + truncated L1 on the map (normal logits pushed below
  ``-l1_margin``, anomalous above ``+l1_margin``) + focal loss on the image logit. AdamW in two
  groups (adaptor; heads), learning rates decayed by ``lr_gamma`` at 80 % and 90 % of the epochs.
* Prediction: the map logits resized to the input, blurred (Gaussian, sigma ``blur_sigma``) and
  passed through a sigmoid; the score is the sigmoid of the image logit (not the map maximum).

``supersimplenet-supervised`` also trains on labelled anomalous images with their masks, moved
out of the test split by the run (``labelled_fraction`` of every defect type; they are never
evaluated): no stop-gradient, gradient clipping 1.0, Perlin threshold 0.6, as the paper's
supervised setting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, OptimizerSpec, Step, TrainBatch
from adlib.models.components.features import local_patch_average
from adlib.models.components.focal_loss import binary_focal_loss
from adlib.models.components.maps import gaussian_blur2d, upsample_map
from adlib.models.components.perlin import perlin_noise
from adlib.models.components.schedules import epoch_milestones
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant


def _xavier_init_(module: nn.Module) -> None:
    """Xavier-normal convolution and linear weights, BatchNorm weights 1 (as the paper's code)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)


class SegmentationClassificationHead(nn.Module):
    """The segmentation head (logit map) and the classification head (image logit) on top of it."""

    def __init__(self, channels: int, seg_hidden: int = 1024, cls_hidden: int = 128) -> None:
        super().__init__()
        self.seg = nn.Sequential(nn.Conv2d(channels, seg_hidden, 1), nn.BatchNorm2d(seg_hidden),
                                 nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(seg_hidden, 1, 1, bias=False))
        self.cls_conv = nn.Sequential(nn.Conv2d(channels + 1, cls_hidden, 5, padding=2), nn.BatchNorm2d(cls_hidden),
                                      nn.ReLU(inplace=True))
        self.cls_fc = nn.Linear(2 * cls_hidden + 2, 1)
        _xavier_init_(self)

    def forward(self, seg_features: torch.Tensor, cls_features: torch.Tensor,
                stop_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(map logits ``[B, 1, h, w]``, image logits ``[B]``)."""
        logits = self.seg(seg_features)
        seen = logits.detach() if stop_grad else logits  # what the classification head sees of the map
        hidden = self.cls_conv(torch.cat([cls_features, seen], dim=1))
        pooled = torch.cat([hidden.amax(dim=(2, 3)), hidden.mean(dim=(2, 3)),
                            seen.amax(dim=(2, 3)), seen.mean(dim=(2, 3))], dim=1)
        return logits, self.cls_fc(pooled).reshape(-1)


def truncated_l1(logits: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of ``relu(logit + margin)`` over normal pixels plus mean of ``relu(margin - logit)``
    over anomalous ones (a term is 0 when its class is absent)."""
    normal, anomalous = logits[mask == 0], logits[mask > 0]
    loss = logits.new_zeros(())
    if normal.numel():
        loss = loss + F.relu(normal + margin).mean()
    if anomalous.numel():
        loss = loss + F.relu(margin - anomalous).mean()
    return loss


class SuperSimpleNet(AnomalyModel):
    frozen_modules = ("extractor",)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer2", "layer3"),
                 patch_size: int = 3, adapt_cls_features: bool = False, stop_grad: bool = True,
                 noise_std: float = 0.015, perlin_threshold: float = 0.2, perlin_scales: Sequence[int] = (0, 6),
                 empty_mask_probability: float = 0.5, seg_hidden: int = 1024, cls_hidden: int = 128,
                 focal_gamma: float = 4.0, l1_margin: float = 0.5, adaptor_lr: float = 1e-4,
                 adaptor_weight_decay: float = 1e-2, head_lr: float = 2e-4, head_weight_decay: float = 1e-5,
                 lr_milestones: Sequence[float] = (0.8, 0.9), lr_gamma: float = 0.4, blur_sigma: float = 4.0,
                 backbone_kwargs: dict[str, Any] | None = None, *, normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        if not layers:
            raise ValueError("SuperSimpleNet needs at least one backbone layer in `layers` (e.g. ['layer2', 'layer3'])")
        if not -1.0 <= perlin_threshold < 1.0:
            raise ValueError(f"perlin_threshold applies to Perlin noise in [-1, 1]; got {perlin_threshold} "
                             "(the paper uses 0.2 unsupervised, 0.6 supervised)")
        low, high = (int(s) for s in perlin_scales)
        if not 0 <= low < high:
            raise ValueError(f"perlin_scales are the exponents [low, high) of the Perlin lattice sizes 2^k; got "
                             f"{tuple(perlin_scales)} (the paper: (0, 6))")
        self.extractor = FeatureExtractor(backbone, list(layers), pretrained=pretrained, backbone_dir=backbone_dir,
                                          **dict(backbone_kwargs or {}))
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        channels = sum(self.extractor.channels)
        self.adaptor = nn.Conv2d(channels, channels, 1)
        _xavier_init_(self.adaptor)
        self.head = SegmentationClassificationHead(channels, int(seg_hidden), int(cls_hidden))
        self.patch_size, self.adapt_cls_features, self.stop_grad = int(patch_size), bool(adapt_cls_features), stop_grad
        self.noise_std, self.perlin_threshold = float(noise_std), float(perlin_threshold)
        self.perlin_scales, self.empty_mask_probability = (low, high), float(empty_mask_probability)
        self.focal_gamma, self.l1_margin = float(focal_gamma), float(l1_margin)
        self.adaptor_lr, self.adaptor_weight_decay = float(adaptor_lr), float(adaptor_weight_decay)
        self.head_lr, self.head_weight_decay = float(head_lr), float(head_weight_decay)
        self.lr_milestones, self.lr_gamma = tuple(lr_milestones), float(lr_gamma)
        self.blur_sigma = float(blur_sigma)
        self._generators: dict[str, torch.Generator] = {}

    # ----- features ----------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features ``[B, C, h, w]`` at twice the first layer's resolution, 3x3-averaged."""
        maps = self.extractor(self.normalize_input(images))
        size = (2 * maps[0].shape[-2], 2 * maps[0].shape[-1])
        joined = torch.cat([F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps],
                           dim=1)
        return local_patch_average(joined, self.patch_size)

    def heads(self, raw: torch.Tensor, adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_features = adapted if self.adapt_cls_features else raw
        return self.head(adapted, cls_features, stop_grad=self.stop_grad)

    # ----- synthetic anomalies -----------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        """One generator per device, seeded by the fit's seed (Perlin masks are drawn on the CPU)."""
        key = str(device)
        if key not in self._generators:
            seed = self.fit_context.seed if self.fit_context is not None else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[key]

    def perlin_masks(self, count: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``[count, 1, h, w]`` binary masks: Perlin noise on the next power-of-two grid with
        ``2^k`` lattice cells per axis (k drawn per axis), resized to ``size``, above the threshold;
        each mask is empty with ``empty_mask_probability``."""
        gen = self._generator(torch.device("cpu"))
        grid = tuple(1 << (s - 1).bit_length() for s in size)
        masks = []
        for _ in range(count):
            res = [min(2 ** int(torch.randint(*self.perlin_scales, (1,), generator=gen)), g) for g in grid]
            noise = 2.0 * perlin_noise(grid, res, gen, device=device) - 1.0  # the paper's [-1, 1] scale
            noise = F.interpolate(noise[None, None], size=size, mode="bilinear", align_corners=False)[0]
            empty = float(torch.rand(1, generator=gen)) < self.empty_mask_probability
            masks.append(torch.zeros_like(noise) if empty else (noise > self.perlin_threshold).float())
        return torch.stack(masks)

    def synthesise(self, raw: torch.Tensor, adapted: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        """The batch twice over with feature noise inside Perlin masks (outside known defects):
        (raw, adapted, mask, labels) of the doubled batch."""
        raw, adapted = torch.cat([raw, raw]), torch.cat([adapted, adapted])
        mask, labels = torch.cat([mask, mask]), torch.cat([labels, labels])
        noise_mask = self.perlin_masks(adapted.shape[0], tuple(adapted.shape[-2:]), adapted.device) * (1.0 - mask)
        noise = torch.randn(adapted.shape, generator=self._generator(adapted.device), device=adapted.device)
        noise = noise * self.noise_std * noise_mask
        labels = torch.maximum(labels, noise_mask.flatten(1).amax(dim=1))
        raw = raw if self.adapt_cls_features else raw + noise  # the JIMS classification head reads raw features
        return raw, adapted + noise, torch.maximum(mask, noise_mask), labels

    # ----- training ----------------------------------------------------------------------------
    def configure_optimizers(self) -> list[OptimizerSpec]:
        optimizer = torch.optim.AdamW([
            {"params": self.adaptor.parameters(), "lr": self.adaptor_lr, "weight_decay": self.adaptor_weight_decay},
            {"params": self.head.parameters(), "lr": self.head_lr, "weight_decay": self.head_weight_decay}])
        epochs = self.fit_context.num_epochs if self.fit_context is not None else 1
        scheduler = epoch_milestones(optimizer, epochs, self.lr_milestones, self.lr_gamma)
        return [OptimizerSpec(optimizer, scheduler, interval="epoch")]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        raw = self.features(batch.images)
        adapted = self.adaptor(raw)
        mask = F.interpolate(batch.masks.float(), size=raw.shape[-2:], mode="bilinear", align_corners=False)
        mask = (mask >= 0.5).float()
        raw, adapted, mask, labels = self.synthesise(raw, adapted, mask, batch.labels.float())
        map_logits, image_logits = self.heads(raw, adapted)
        map_focal = binary_focal_loss(map_logits, mask, self.focal_gamma)
        map_l1 = truncated_l1(map_logits, mask, self.l1_margin)
        image_focal = binary_focal_loss(image_logits, labels, self.focal_gamma)
        return {"loss": map_focal + map_l1 + image_focal, "map_focal": map_focal.detach(),
                "map_l1": map_l1.detach(), "image_focal": image_focal.detach()}

    # ----- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        raw = self.features(images)
        map_logits, image_logits = self.heads(raw, self.adaptor(raw))
        maps = upsample_map(map_logits[:, 0].float(), images.shape[-2:])
        maps = gaussian_blur2d(maps, self.blur_sigma, radius=math.ceil(3 * self.blur_sigma))
        return AnomalyOutput(scores=torch.sigmoid(image_logits.float()), maps=torch.sigmoid(maps))


register(ModelSpec(
    name="supersimplenet", cls=SuperSimpleNet, family="foundation",
    paper="Rolih, Fučka, Skočaj, SuperSimpleNet: Unifying Unsupervised and Supervised Learning for Fast and "
          "Reliable Surface Defect Detection, ICPR 2024 (arXiv:2408.03143); No Label Left Behind: A Unified Surface "
          "Defect Detection Model for all Supervision Regimes, J. Intell. Manuf. 2025",
    train=TrainDefaults(num_epochs=300, batch_size=32, img_size=256),
    description="Wide-ResNet-50-2 layer2+3, feature adaptor, Perlin feature-noise anomalies, segmentation and "
                "classification heads (JIMS head), unsupervised"))
register_variant("supersimplenet-supervised", base="supersimplenet", train_labels="labelled",
                 model={"stop_grad": False, "perlin_threshold": 0.6},
                 train={"grad_clip_norm": 1.0, "labelled_fraction": 0.5},
                 description="as supersimplenet, also trained on labelled anomalous images with masks (half of each "
                             "defect type moved out of the test split), no stop-gradient, clipping 1.0")
