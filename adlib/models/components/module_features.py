"""The output of one named module of a frozen CNN, for feature maps that timm's ``features_only``
stages do not offer: e.g. EfficientNet's stage ``blocks.5`` (CS-Flow's 304-channel features of
EfficientNet-B5), which shares its stride with the last stage, so timm reports only the latter.

The full network is built (and its offline weights loaded) by :func:`adlib.backbones.create_backbone`,
then traced with torch.fx up to the requested module: later modules are pruned away.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import create_feature_extractor
from torch import nn

from adlib.backbones import create_backbone, input_stats

#: containers whose children are the stages a user names (``blocks.5``, ``layer3``, ``stages.2``)
_STAGE_CONTAINERS = ("blocks", "stages", "layers", "features")
#: side of the probe image that measures channels and stride
_PROBE = 256


def stage_names(model: nn.Module) -> list[str]:
    """The stage-level module names of a timm CNN, in forward order (what error messages offer)."""
    names = [name for name, _ in model.named_children() if name.startswith("layer") and name[5:].isdigit()]
    for container in _STAGE_CONTAINERS:
        module = getattr(model, container, None)
        if isinstance(module, nn.Sequential):
            names += [f"{container}.{child}" for child, _ in module.named_children()]
    return names


class ModuleFeatures(nn.Module):
    """Frozen CNN returning the ``[B, C, h, w]`` output of module ``layer`` (e.g. ``"blocks.5"``)."""

    def __init__(self, name: str, layer: str, *, pretrained: bool = True, backbone_dir: str | Path | None = None,
                 **timm_kwargs) -> None:
        super().__init__()
        model = create_backbone(name, pretrained=pretrained, backbone_dir=backbone_dir, **timm_kwargs).eval()
        valid = stage_names(model)
        if layer not in valid:
            raise ValueError(f"layer {layer!r} is not a stage of backbone {name!r}; valid layers: "
                             f"{', '.join(valid) or '(none found)'}")
        self.name, self.layer = name, layer
        self.weights_provenance = model.weights_provenance
        self.model = create_feature_extractor(model, {layer: "out"}).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = input_stats(name)
        with torch.no_grad():
            probe = self.model(torch.zeros(1, 3, _PROBE, _PROBE))["out"]
        self.channels = int(probe.shape[1])
        self.reduction = _PROBE // int(probe.shape[-1])

    def train(self, mode: bool = True) -> "ModuleFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=torch.channels_last))["out"].contiguous()
