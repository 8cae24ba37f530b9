"""Model implementations. :func:`load_all` imports every model module, which registers its
configurations; the registry calls it on first use, so importing this package stays cheap."""
from __future__ import annotations

import importlib

from adlib.models.base import (AnomalyModel, AnomalyOutput, AuxStream, DataPass, FitContext, OptimizerSpec, Step,
                               TrainBatch)
from adlib.models.registry import (ModelSpec, TrainDefaults, create_model, list_models, register, register_variant,
                                   resolve_config)

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
    "dinomaly",
    "supersimplenet",
)


def load_all() -> None:
    """Import every model module (each registers its configurations when imported)."""
    for module in _MODEL_MODULES:
        importlib.import_module(f"adlib.models.{module}")


__all__ = ["AnomalyModel", "AnomalyOutput", "AuxStream", "DataPass", "FitContext", "ModelSpec", "OptimizerSpec",
           "Step", "TrainBatch", "TrainDefaults", "create_model", "list_models", "register", "register_variant",
           "resolve_config"]
