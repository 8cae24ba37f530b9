"""Settings of DSR's offline stage 1 (:mod:`adlib.backbones.dsr_vq_training`), torch-free so
that the command line can show their defaults without importing torch."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VqTrainingConfig:
    """Stage-1 settings. Architecture defaults: the authors' released model; schedule: ours
    (the authors' stage-1 schedule is not part of their released code)."""

    steps: int = 30000
    batch_size: int = 32
    img_size: int = 256  # side of the random training crops (the model is fully convolutional)
    lr: float = 3e-4
    commitment: float = 0.25
    decay: float = 0.99
    dead_code_threshold: float = 1e-3
    hidden: int = 128
    residual_layers: int = 2
    residual_hidden: int = 64
    num_embeddings: int = 4096
    embedding_dim: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "img_size", "hidden", "residual_hidden", "num_embeddings",
                    "embedding_dim"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"train-dsr-vq: {key} must be a positive integer; got {getattr(self, key)}")
        if self.img_size % 8:
            raise ValueError(f"train-dsr-vq: img_size must be a multiple of 8 (the lo grid is 1/8 of the side); "
                             f"got {self.img_size}, e.g. use {max(8, round(self.img_size / 8) * 8)}")
        if self.hidden % 2:
            raise ValueError(f"train-dsr-vq: hidden must be even; got {self.hidden}")

    def architecture(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in ("hidden", "residual_layers", "residual_hidden",
                                                    "num_embeddings", "embedding_dim")}

    def resumable_with(self, other: "VqTrainingConfig") -> bool:
        """Same run apart from its length."""
        return dataclasses.replace(self, steps=other.steps) == other
