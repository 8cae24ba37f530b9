"""Settings of an EfficientAD teacher distillation (:mod:`adlib.backbones.distill`), torch-free
so that the command line can show their defaults without importing torch."""
from __future__ import annotations

import dataclasses
from typing import Any

from adlib.models.components.pdn_sizes import check_size

#: settings that may change between a checkpoint and its resumption
_RESUMABLE_CHANGES = ("steps", "checkpoint_every")


class DistillError(ValueError):
    """Bad input for a teacher distillation (folder, output, checkpoint, backbone layers)."""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """One distillation; the defaults are the paper's (60 000 steps of 16 images, Adam 1e-4)."""

    images: str  # folder of natural images, searched recursively
    size: str = "small"
    source: str = "wide_resnet101_2"  # backbone whose features are distilled (the paper's)
    layers: tuple[str, ...] = ("layer2", "layer3")
    steps: int = 60_000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-5
    img_size: int = 256  # the PDN's input side; the backbone sees twice that
    out_channels: int = 384
    pool_dim: int = 1024  # per-layer feature length before the layers are pooled together
    norm_images: int = 10_000  # images for the target's channel statistics (at most the folder)
    grayscale: float = 0.1  # probability of a grayscale image (both views)
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        check_size(self.size)
        for key in ("steps", "batch_size", "img_size", "out_channels", "pool_dim", "norm_images", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise DistillError(f"{key} must be a positive integer; got {getattr(self, key)}")
        if self.img_size % 4:
            raise DistillError(f"img_size must be a multiple of 4 (the PDN's map is a quarter of it); got "
                               f"{self.img_size}, use e.g. {max(4, round(self.img_size / 4) * 4)}")
        object.__setattr__(self, "layers", tuple(self.layers))

    def comparable(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE_CHANGES}


