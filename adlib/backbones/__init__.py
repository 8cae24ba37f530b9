"""Offline backbones: weight resolution (never downloads) and a frozen multi-layer extractor.

Names are imported lazily: ``from adlib.backbones.catalog import ...`` (the CLI, the workflow's
preflight) never imports torch or timm.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "CATALOG": "catalog", "candidate_files": "catalog", "catalog_entry": "catalog",
    "FeatureExtractor": "extractor", "create_backbone": "extractor", "input_stats": "extractor",
    "resolve_layers": "extractor",
    "ManifestError": "inventory", "list_backbones": "inventory", "verify_backbones": "inventory",
    "write_checksums": "inventory",
    "MissingWeightsError": "locate", "resolve_weights": "locate",
    "WeightsFileError": "weights", "load_pretrained": "weights", "read_state_dict": "weights",
    "read_weights": "weights",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'adlib.backbones' has no attribute {name!r}")
    return getattr(importlib.import_module(f"adlib.backbones.{_WHERE[name]}"), name)
