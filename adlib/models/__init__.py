"""Model implementations. Importing this package registers every configuration."""
from __future__ import annotations

import importlib

from adlib.models.base import AnomalyModel, AnomalyOutput, FitContext
from adlib.models.registry import ModelSpec, TrainDefaults, create_model, list_models, register, resolve_config

# One module per method; each registers its configurations when imported.
_MODEL_MODULES = (
    "padim",
    "patchcore",
    "stfpm",
)

for _module in _MODEL_MODULES:
    importlib.import_module(f"adlib.models.{_module}")

__all__ = ["AnomalyModel", "AnomalyOutput", "FitContext", "ModelSpec", "TrainDefaults",
           "create_model", "list_models", "register", "resolve_config"]
