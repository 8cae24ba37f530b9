"""Offline backbones: weight resolution (never downloads) and a frozen multi-layer extractor."""
from adlib.backbones.extractor import FeatureExtractor, create_backbone, input_stats, resolve_layers
from adlib.backbones.weights import MissingWeightsError, load_pretrained

__all__ = ["FeatureExtractor", "MissingWeightsError", "create_backbone", "input_stats", "load_pretrained",
           "resolve_layers"]
