"""The PDN sizes of EfficientAD (torch-free: the command line lists them)."""
from __future__ import annotations

PDN_SIZES = ("small", "medium")


def check_size(size: str) -> str:
    if size not in PDN_SIZES:
        raise ValueError(f"EfficientAD model_size must be one of {PDN_SIZES}; got {size!r}")
    return size
