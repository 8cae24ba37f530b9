"""Outputs of intermediate transformer blocks (ViT, DeiT, CaiT ... any timm model with
``forward_intermediates``), frozen.

:class:`VitBlockFeatures`: each requested block's output tokens go through the backbone's final
LayerNorm, prefix tokens (class / distillation) are dropped and the patch tokens are reshaped to
``[B, C, H/p, W/p]`` maps. :class:`VitBlockTokens`: the raw token sequences (prefix tokens
included, no final norm) of a plain ViT at any input size that is a multiple of the patch size.

Blocks after the deepest requested one and the classifier head are pruned away, so a ViT used
up to block 7 only costs those 8 blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from adlib.backbones import create_backbone, input_stats


def frozen_transformer(name: str, blocks: Sequence[int], *, pretrained: bool, backbone_dir: str | Path | None,
                       prune_norm: bool, **timm_kwargs) -> nn.Module:
    """timm transformer ``name`` with offline (or seeded random) weights, pruned after the deepest
    of ``blocks``, in eval mode without gradients."""
    model = create_backbone(name, pretrained=pretrained, backbone_dir=backbone_dir, **timm_kwargs)
    if not all(hasattr(model, a) for a in ("forward_intermediates", "blocks", "patch_embed")):
        raise ValueError(f"backbone {name!r} is not a transformer with blocks: choose a ViT-style timm model "
                         "(or, where the model offers it, a CNN configuration with layers=...)")
    depth = len(model.blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"block index {bad} out of range for {name!r} with {depth} blocks (valid 0..{depth - 1})")
    model.prune_intermediate_layers(list(blocks), prune_norm=prune_norm, prune_head=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def patch_size(model: nn.Module) -> int:
    patch = model.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


class _FrozenBlocks(nn.Module):
    """A frozen transformer read at ``blocks``; always in eval mode."""

    def __init__(self, name: str, blocks: Sequence[int], *, pretrained: bool, backbone_dir: str | Path | None,
                 prune_norm: bool, **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        self.blocks = [int(b) for b in blocks]
        self.model = frozen_transformer(name, self.blocks, pretrained=pretrained, backbone_dir=backbone_dir,
                                        prune_norm=prune_norm, **timm_kwargs)
        self.mean, self.std = input_stats(name)

    def train(self, mode: bool = True) -> "_FrozenBlocks":
        return super().train(False)


class VitBlockFeatures(_FrozenBlocks):
    """Frozen extractor returning one ``[B, C, h, w]`` map per index in ``blocks`` (0-based)."""

    def __init__(self, name: str, blocks: Sequence[int], *, pretrained: bool = True,
                 backbone_dir: str | Path | None = None, **timm_kwargs) -> None:
        super().__init__(name, blocks, pretrained=pretrained, backbone_dir=backbone_dir, prune_norm=False,
                         **timm_kwargs)
        model = self.model
        self.channels = [int(model.embed_dim)] * len(self.blocks)
        self.reductions = [patch_size(model)] * len(self.blocks)
        self.img_size = tuple(getattr(model.patch_embed, "img_size", None) or ())

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


class VitBlockTokens(_FrozenBlocks):
    """Frozen plain ViT returning the raw output tokens ``[B, P + h * w, C]`` of each block in
    ``blocks`` (0-based): ``P`` = :attr:`num_prefix_tokens` (class and register tokens) first, no
    final LayerNorm. Built with ``dynamic_img_size``: any input whose sides are multiples of
    :attr:`patch_size` works, the positional embeddings are resampled to its grid (as the
    original DINOv2 code does)."""

    def __init__(self, name: str, blocks: Sequence[int], *, pretrained: bool = True,
                 backbone_dir: str | Path | None = None, **timm_kwargs) -> None:
        super().__init__(name, blocks, pretrained=pretrained, backbone_dir=backbone_dir, prune_norm=True,
                         **{"dynamic_img_size": True, **timm_kwargs})
        model = self.model
        if not hasattr(model, "_pos_embed"):
            raise ValueError(f"backbone {name!r} is not a plain timm VisionTransformer (no _pos_embed); "
                             "use a ViT such as vit_base_patch14_reg4_dinov2")
        self.embed_dim = int(model.embed_dim)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.patch_size = patch_size(model)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        wanted, out = set(self.blocks), {}
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i in wanted:
                out[i] = x
        return [out[i] for i in self.blocks]
