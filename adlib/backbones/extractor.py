"""timm-based multi-layer feature extractor that accepts the original specification's layer names.

Layer names: a timm feature module name (``"layer2"``, ``"blocks.2"``) or one of the original specification's
ResNet names ``"layer1".."layer4"``, which for non-ResNet backbones map to the feature stage of
the same stride (4, 8, 16, 32).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from adlib.backbones.folding import fold_batchnorms

log = logging.getLogger(__name__)

_SEED_LAYER_STRIDE = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
#: backbones whose pretrained weights expect inputs scaled with mean = std = 0.5
_HALF_STATS_PREFIXES = ("tf_efficientnet_lite",)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
#: on the CPU an extractor without gradients (frozen, or trainable and evaluating) runs larger
#: batches this many images at a time: its activations shrink in proportion and the maps are
#: bit-identical. 32 images at 256 px, batch norms folded, 2 cores, peak / s per batch:
#: ResNet18 +156 MiB / 0.291 s in chunks of 8, +126 / 0.300 in chunks of 4; Wide-ResNet50
#: +300 / 1.78 at 8, +249 / 1.88 at 4 (see DEPTHWISE_CHUNK). GPUs run the whole batch.
FROZEN_CHUNK = 8
#: the chunk of networks with depthwise convolutions (EfficientNet, MobileNet), whose CPU forward
#: is bound by memory traffic rather than arithmetic: Lite0 +166-183 MiB / 0.143-0.153 s at 8,
#: +99-103 / 0.140-0.141 at 4, +60 / 0.141-0.143 at 2 (docs/benchmarks.md)
DEPTHWISE_CHUNK = 4
#: provenance "source" of a backbone built with pretrained=False
RANDOM_SOURCE = "random-init (seed 0)"


def input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that backbone ``name`` expects for [0, 1] inputs."""
    return HALF_STATS if name.startswith(_HALF_STATS_PREFIXES) else IMAGENET_STATS


def check_architecture(name: str, backbone_dir: str | Path | None = None) -> None:
    """A ``ValueError`` naming close timm names and the backbones with weights at hand when
    ``name`` is not a timm architecture."""
    if timm.is_model(name):
        return
    import difflib

    from adlib.backbones.inventory import list_backbones

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    present = [row["name"] for row in list_backbones(backbone_dir) if row["present"]]
    raise ValueError(f"unknown backbone {name!r}: not a timm architecture"
                     + (f" (did you mean {', '.join(close)}?)" if close else "")
                     + (f". Backbones with weights available now: {', '.join(present)}" if present else ""))


def create_backbone(name: str, *, pretrained: bool, backbone_dir: str | Path | None = None,
                    warn_random: bool = True, **timm_kwargs) -> nn.Module:
    """Build timm model ``name``; load offline weights when ``pretrained``, else a seeded random init.

    Random init is seeded by a fixed value so the same architecture gives the same weights in
    every process (a saved run reloads an identical frozen backbone). Where the weights came
    from is kept in ``model.weights_provenance`` ({"backbone", "source", "sha256", ...}).
    """
    check_architecture(name, backbone_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    if pretrained:
        from adlib.backbones.weights import load_pretrained

        provenance = load_pretrained(model, name, backbone_dir, **timm_kwargs)
    else:
        if warn_random:  # a random *frozen* backbone is the suspicious case; a trainable one is not
                log.warning("backbone %s uses RANDOM weights (pretrained=False): results are not meaningful "
                        "for benchmarking", name)
        provenance = {"backbone": name, "source": RANDOM_SOURCE, "sha256": None, "format": None}
    model.weights_provenance = provenance
    return model


def resolve_layers(feature_info, layers: Sequence[str]) -> list[int]:
    """Indices into timm's feature_info for the requested layer names."""
    names = feature_info.module_name()
    reductions = feature_info.reduction()
    indices = []
    for layer in layers:
        if layer in names:
            indices.append(names.index(layer))
        elif layer in _SEED_LAYER_STRIDE and _SEED_LAYER_STRIDE[layer] in reductions:
            # last stage with that stride (the deepest features at that resolution)
            stride = _SEED_LAYER_STRIDE[layer]
            indices.append(max(i for i, r in enumerate(reductions) if r == stride))
        else:
            raise ValueError(f"layer {layer!r} not available; valid layers: {names} "
                             f"(or {sorted(_SEED_LAYER_STRIDE)} by stride)")
    return indices


def has_depthwise_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (one group per input channel)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def drop_unused_stages(model: nn.Module) -> int:
    """Remove the stages after the deepest returned one from a timm EfficientNet/MobileNet
    feature network, which runs all its stages whatever ``out_indices`` asks for; returns how
    many it removed. (timm's ResNet-style feature networks already stop at their last layer.)"""
    stages = getattr(model, "_stage_out_idx", None)  # feature stage -> output index; stage s is blocks[s - 1]'s output
    blocks = getattr(model, "blocks", None)
    if not stages or not isinstance(blocks, nn.Sequential) or getattr(model, "feature_hooks", None) is not None:
        return 0
    keep = max(stages)
    if keep >= len(blocks):
        return 0
    model.blocks = blocks[:keep]
    return len(blocks) - keep


class FeatureExtractor(nn.Module):
    """Returns a list of feature maps, one per requested layer, shallow to deep.

    ``frozen=True`` (default): eval mode forever, no gradients, batch norms folded into the
    convolutions before them (:mod:`adlib.backbones.folding`), and the network runs on
    channels-last tensors (oneDNN's convolutions: 1.28-1.36x faster on 2 CPU cores for Lite0,
    ResNet18 and Wide-ResNet50, conversions included); the returned maps are ordinary contiguous
    tensors either way. On the CPU, batches larger than ``chunk`` images (:data:`FROZEN_CHUNK`, or
    :data:`DEPTHWISE_CHUNK` for depthwise networks) are run in chunks of that size, by trainable
    extractors too while they evaluate without gradients.
    ``frozen=False`` gives a trainable copy (e.g. STFPM's student, built with
    ``pretrained=False``); ``checkpoint=True`` makes it recompute each stage's activations in
    the backward pass instead of keeping them (:mod:`adlib.backbones.checkpointing`).
    """

    def __init__(self, name: str, layers: Sequence[str], *, pretrained: bool = True,
                 backbone_dir: str | Path | None = None, frozen: bool = True, checkpoint: bool = False,
                 **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        self.layers = list(layers)
        check_architecture(name, backbone_dir)
        probe = timm.create_model(name, pretrained=False, features_only=True, **timm_kwargs)
        indices = resolve_layers(probe.feature_info, self.layers)
        del probe
        self.model = create_backbone(name, pretrained=pretrained, backbone_dir=backbone_dir, warn_random=frozen,
                                     features_only=True, out_indices=tuple(sorted(set(indices))), **timm_kwargs)
        order = sorted(set(indices))
        self._pick = [order.index(i) for i in indices]
        info = self.model.feature_info
        self.channels = [info.channels()[j] for j in self._pick]
        self.reductions = [info.reduction()[j] for j in self._pick]
        self.mean, self.std = input_stats(name)
        self.weights_provenance = self.model.weights_provenance
        if drop_unused_stages(self.model):
            self.register_load_state_dict_pre_hook(functools.partial(_without_dropped_stages,
                                                                     kept=len(self.model.blocks)))
        self.frozen = frozen
        self.chunk = DEPTHWISE_CHUNK if has_depthwise_convolutions(self.model) else FROZEN_CHUNK
        if frozen:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.to(memory_format=torch.channels_last)
            fold_batchnorms(self.model)
        elif checkpoint:
            from adlib.backbones.checkpointing import checkpoint_stages

            if not checkpoint_stages(self.model):
                log.warning("backbone %s: no stages found to checkpoint; training keeps all activations", name)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if (images.shape[0] > self.chunk and images.device.type == "cpu"
                and (self.frozen or not (self.training or torch.is_grad_enabled()))):
            # same maps (evaluation-mode networks treat images independently), a fraction of the activations
            parts = [self(images[i:i + self.chunk]) for i in range(0, images.shape[0], self.chunk)]
            return [torch.cat(maps) for maps in zip(*parts)]
        if self.frozen:
            with torch.no_grad():
                feats = self.model(images.contiguous(memory_format=torch.channels_last))
            return [feats[j].contiguous() for j in self._pick]
        feats = self.model(images)
        return [feats[j] for j in self._pick]


def _without_dropped_stages(_module, state_dict, prefix, *_, kept: int) -> None:
    """Runs saved before :func:`drop_unused_stages` hold the weights of the removed stages
    (``blocks.<kept>`` on): ignore them."""
    blocks = f"{prefix}model.blocks."
    for key in [k for k in state_dict if k.startswith(blocks)]:
        if int(key[len(blocks):].split(".", 1)[0]) >= kept:
            del state_dict[key]
