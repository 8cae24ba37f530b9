"""FastFlow: 2D normalising flows on frozen backbone features.

Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows",
arXiv:2111.07677 (2021). Each feature map of a frozen backbone (CNN stages, or the patch tokens
of one transformer block reshaped to a map) is layer-normalised and fed to its own 2D flow of
affine coupling blocks whose subnets alternate 3x3 and 1x1 convolutions. Training maximises the
likelihood of the normal features under a standard normal latent:
``loss = sum_layers mean_batch(0.5 * sum(z^2) - log|det J|)``.

Anomaly map: per layer the likelihood-like ``p = exp(-0.5 * mean_channels(z^2))`` is upsampled
to the input size; the map is ``1 - mean_layers(p)`` (the paper's negative probability shifted by 1
so maps lie in [0, 1]; the ordering is identical). The image score is the maximum of the map.

CNN features are normalised by a LayerNorm over ``(C, H, W)`` without learned affine parameters
(so the model is independent of the image size); transformer tokens use the backbone's own
final LayerNorm, as in the paper's code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, Step, TrainBatch
from adlib.models.components.flow import coupling_flow_2d, gaussian_nll, likelihood_map
from adlib.models.components.maps import max_score
from adlib.models.components.vit_features import VitBlockFeatures
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant


class Fastflow(AnomalyModel):
    frozen_modules = ("extractor",)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 vit_block: int | None = None, backbone_kwargs: dict[str, Any] | None = None, flow_steps: int = 8,
                 conv3x3_only: bool = False, hidden_ratio: float = 1.0, clamp: float = 2.0, lr: float = 1e-3,
                 weight_decay: float = 1e-5, *, normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        kwargs = dict(backbone_kwargs or {})
        if vit_block is not None:
            if layers:
                raise ValueError("FastFlow takes either CNN `layers` or a transformer `vit_block`, not both; "
                                 "set layers=[] when vit_block is given")
            self.extractor = VitBlockFeatures(backbone, [vit_block], pretrained=pretrained,
                                              backbone_dir=backbone_dir, **kwargs)
        else:
            if not layers:
                raise ValueError("FastFlow needs at least one CNN layer in `layers` (or a `vit_block`)")
            self.extractor = FeatureExtractor(backbone, list(layers), pretrained=pretrained,
                                              backbone_dir=backbone_dir, **kwargs)
        self.is_vit = vit_block is not None
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.flows = nn.ModuleList(
            coupling_flow_2d(c, int(flow_steps), conv3x3_only=conv3x3_only, hidden_ratio=hidden_ratio, clamp=clamp)
            for c in self.extractor.channels)
        self.lr, self.weight_decay = float(lr), float(weight_decay)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = [f.float() for f in self.extractor(self.normalize_input(images))]
        if self.is_vit:
            return feats  # already normalised by the transformer's final LayerNorm
        return [F.layer_norm(f, f.shape[1:]) for f in feats]

    def latents(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(z, log_jac_det)`` of every flow."""
        return [flow(f) for flow, f in zip(self.flows, self.features(images))]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.flows.parameters(), lr=self.lr, weight_decay=self.weight_decay)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        return sum(gaussian_nll(z, jac).mean() for z, jac in self.latents(batch.images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        maps = likelihood_map([z for z, _ in self.latents(images)], images.shape[-2:])
        return AnomalyOutput(scores=max_score(maps), maps=maps)


register(ModelSpec(
    name="fastflow", cls=Fastflow, family="flow",
    paper="Yu et al., FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows, "
          "arXiv:2111.07677 (2021)",
    train=TrainDefaults(num_epochs=500, batch_size=32, img_size=256),
    description="Wide-ResNet-50-2 stages 1-3, 8 flow steps alternating 3x3/1x1 subnets",
    aliases=("fastflow-wrn50",)))
register_variant("fastflow-resnet50", base="fastflow", model={"backbone": "resnet50"},
                 description="ResNet-50 stages 1-3, 8 flow steps alternating 3x3/1x1 subnets (the original "
                             "specification's name)")
register_variant("fastflow-resnet18", base="fastflow", model={"backbone": "resnet18", "conv3x3_only": True},
                 description="ResNet-18 stages 1-3, 8 flow steps with 3x3 subnets")
_VIT = {"layers": [], "flow_steps": 20, "hidden_ratio": 0.16}
register_variant("fastflow-cait", base="fastflow", model={**_VIT, "backbone": "cait_m48_448", "vit_block": 40},
                 train={"img_size": 448}, description="CaiT-M48 patch tokens after block 40 (0-based), 20 flow steps")
register_variant("fastflow-deit", base="fastflow",
                 model={**_VIT, "backbone": "deit_base_distilled_patch16_384", "vit_block": 7},
                 train={"img_size": 384}, description="DeiT-base-distilled patch tokens after block 7 (0-based), "
                                                      "20 flow steps")
