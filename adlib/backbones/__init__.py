"""Offline backbones: weight resolution (never downloads) and a frozen multi-layer extractor."""
from adlib.backbones.catalog import CATALOG, candidate_files, catalog_entry
from adlib.backbones.extractor import FeatureExtractor, create_backbone, input_stats, resolve_layers
from adlib.backbones.inventory import ManifestError, list_backbones, verify_backbones, write_checksums
from adlib.backbones.weights import (MissingWeightsError, WeightsFileError, load_pretrained, read_state_dict,
                                     read_weights, resolve_weights)

__all__ = ["CATALOG", "FeatureExtractor", "ManifestError", "MissingWeightsError", "WeightsFileError",
           "candidate_files", "catalog_entry", "create_backbone", "input_stats", "list_backbones",
           "load_pretrained", "read_state_dict", "read_weights", "resolve_layers", "resolve_weights",
           "verify_backbones", "write_checksums"]
