"""adlib: offline-first benchmark library for industrial visual anomaly detection."""
from __future__ import annotations

__version__ = "0.1.0"

from adlib.settings import Settings  # noqa: E402

__all__ = ["Settings", "__version__", "create_model", "list_models", "train", "train_models"]


def __getattr__(name: str):
    # Lazy: importing adlib must stay cheap (the CLI and Snakemake import it for small things).
    if name in {"create_model", "list_models"}:
        from adlib.models import registry

        return getattr(registry, name)
    if name in {"train", "train_models"}:
        from adlib import api

        return getattr(api, name)
    raise AttributeError(f"module 'adlib' has no attribute {name!r}")
