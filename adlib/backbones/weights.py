"""Offline weight resolution (placeholder until the backbone layer lands)."""
from __future__ import annotations

from pathlib import Path

from torch import nn


class MissingWeightsError(FileNotFoundError):
    pass


def load_pretrained(model: nn.Module, name: str, backbone_dir: str | Path | None) -> str:
    raise MissingWeightsError(f"no offline weights for {name}")
