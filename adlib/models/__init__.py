"""Model implementations. :func:`load_all` imports every model module, which registers its
configurations; the registry calls it on first use. The names below are imported lazily, so
importing this package (e.g. for :mod:`adlib.models.index`) does not import torch."""
from __future__ import annotations

import importlib

_BASE = ("AnomalyModel", "AnomalyOutput", "AuxStream", "DataPass", "FitContext", "OptimizerSpec", "Step", "TrainBatch")
_REGISTRY = ("ModelSpec", "TrainDefaults", "create_model", "list_models", "register", "register_variant",
             "resolve_config")

# One module per method; each registers its configurations when imported.
_MODEL_MODULES = (
    "padim",
    "patchcore",
    "stfpm",
    "dfkde",
    "dfm",
    "fastflow",
    "draem",
    "autoencoder",
    "cflow",
    "csflow",
    "uflow",
    "ganomaly",
    "dsr",
    "cfa",
    "fre",
    "reverse_distillation",
    "uninet",
    "efficientad",
    "dinomaly",
    "supersimplenet",
)


def load_all() -> None:
    """Import every model module (each registers its configurations when imported)."""
    for module in _MODEL_MODULES:
        importlib.import_module(f"adlib.models.{module}")


__all__ = [*_BASE, *_REGISTRY]


def __getattr__(name: str):
    if name in _BASE:
        return getattr(importlib.import_module("adlib.models.base"), name)
    if name in _REGISTRY:
        return getattr(importlib.import_module("adlib.models.registry"), name)
    raise AttributeError(f"module 'adlib.models' has no attribute {name!r}")
