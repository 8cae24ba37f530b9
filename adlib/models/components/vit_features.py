"""Token maps of intermediate transformer blocks (ViT, DeiT, CaiT ... any timm model with
``forward_intermediates``), reshaped to 2D feature maps.

Each requested block's output tokens go through the backbone's final LayerNorm, prefix tokens
(class / distillation) are dropped and the patch tokens are reshaped to ``[B, C, H/p, W/p]``.
Blocks after the deepest requested one and the classifier head are pruned away, so a ViT used
up to block 7 only costs those 8 blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from adlib.backbones import create_backbone, input_stats


class VitBlockFeatures(nn.Module):
    """Frozen extractor returning one ``[B, C, h, w]`` map per index in ``blocks`` (0-based)."""

    def __init__(self, name: str, blocks: Sequence[int], *, pretrained: bool = True,
                 backbone_dir: str | Path | None = None, **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        self.blocks = [int(b) for b in blocks]
        model = create_backbone(name, pretrained=pretrained, backbone_dir=backbone_dir, **timm_kwargs)
        if not all(hasattr(model, a) for a in ("forward_intermediates", "blocks", "patch_embed")):
            raise ValueError(f"backbone {name!r} is not a transformer with blocks; use a CNN configuration "
                             "(layers=...) instead of vit_block")
        depth = len(model.blocks)
        bad = [b for b in self.blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"block index {bad} out of range for {name!r} with {depth} blocks (valid 0..{depth - 1})")
        model.prune_intermediate_layers(self.blocks, prune_norm=False, prune_head=True)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.channels = [int(model.embed_dim)] * len(self.blocks)
        patch = model.patch_embed.patch_size
        self.reductions = [int(patch[0] if isinstance(patch, (tuple, list)) else patch)] * len(self.blocks)
        self.img_size = tuple(getattr(model.patch_embed, "img_size", None) or ())
        self.mean, self.std = input_stats(name)

    def train(self, mode: bool = True) -> "VitBlockFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        strict = getattr(self.model.patch_embed, "strict_img_size", False)
        if strict and self.img_size and tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(
                f"backbone {self.name} expects {self.img_size[0]}x{self.img_size[1]} inputs but got "
                f"{images.shape[-2]}x{images.shape[-1]}: train with img_size={self.img_size[0]} or build the "
                f"backbone for your size with backbone_kwargs={{'img_size': {images.shape[-1]}}}")
        return list(self.model.forward_intermediates(images, indices=self.blocks, norm=True, stop_early=True,
                                                     output_fmt="NCHW", intermediates_only=True))
