"""Smoke-test sizes of every registered configuration: the same code path at a size that trains
a few steps on a CPU in seconds (tests/test_all_models.py, benchmarks/gpu_check.py).

The registered configurations stay the papers'; these overrides only shrink widths, depths,
image sizes and budgets. Big CNN backbones become ResNet-18 (same layer names); transformers
are built with few blocks at a small input size.
"""
from __future__ import annotations

import fnmatch
from typing import Any

#: image side of a smoke test
SMOKE_IMG = 64
#: per-pattern overrides, applied in order (later patterns win)
SMOKE_OVERRIDES: dict[str, dict[str, Any]] = {
    "*": {"img_size": SMOKE_IMG, "batch_size": 4, "max_steps": 2},
    "draem": {"base_width": 8, "disc_base_width": 8},
    "autoencoder": {"channels": [4, 8, 8, 8]},
    "fastflow-cait": {"img_size": 32, "backbone_kwargs": {"img_size": 32, "depth": 2}, "vit_block": 1,
                      "flow_steps": 2},
    "fastflow-deit": {"img_size": 32, "backbone_kwargs": {"img_size": 32, "depth": 2}, "vit_block": 1,
                      "flow_steps": 2},
    "cflow*": {"coupling_blocks": 2, "fiber_batch_size": 64},
    # a stride-16 stage of an EfficientNet-family CNN (B5's path uses blocks.5, stride 32): 3 scales at 64 px
    "csflow": {"backbone": "tf_efficientnet_lite0", "layer": "blocks.4", "hidden_channels": 16,
               "coupling_blocks": 2, "kernel_sizes": [3, 5]},
    "uflow": {"img_size": 32, "backbone_kwargs": {"img_size": 32, "depth": 2}, "vit_block": 1,
              "coarse_backbone_kwargs": {"img_size": 16, "depth": 2}, "coarse_vit_block": 1, "flow_steps": 2},
    "uflow-resnet18": {"flow_steps": 2},
    "ganomaly": {"n_features": 4, "latent_dim": 8},
    "dsr": {"num_embeddings": 16, "embedding_dim": 8, "hidden": 8, "residual_hidden": 4, "residual_layers": 1,
            "restriction_width": 4, "detector_width": 4, "decoder_bottleneck": 4},
    "cfa": {"center_crop": None},
    "reverse_distillation": {"bottleneck_blocks": 1, "decoder_blocks": [1, 1, 1], "width_ratio": 0.25},
    "uninet*": {"bottleneck_blocks": 1, "decoder_blocks": [1, 1, 1], "width_ratio": 0.25},
    "efficientad-*": {"batch_size": 1},  # the method trains on one image per step
    # one tiny ViT for all 18 Dinomaly configurations; 56 px = 4 x 4 patches of 14, no crop
    "dinomaly-*": {"img_size": 56, "center_crop": None, "target_layers": [0, 1, 2, 3], "groups": [[0, 1], [2, 3]],
                   "decoder_depth": 4, "backbone_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2}},
    "supersimplenet*": {"seg_hidden": 16, "cls_hidden": 8},
}
#: CNN backbones replaced by ResNet-18 in smoke tests
BIG_CNNS = {"wide_resnet50_2", "wide_resnet101_2", "resnet50", "efficientnet_b5", "tf_efficientnet_b5"}


def smoke_overrides(name: str) -> dict[str, Any]:
    """The overrides that shrink configuration ``name`` for a smoke test."""
    from adlib.models.registry import resolve_config

    out: dict[str, Any] = {}
    if resolve_config(name).model.get("backbone") in BIG_CNNS:
        out["backbone"] = "resnet18"
    for pattern, values in SMOKE_OVERRIDES.items():
        if fnmatch.fnmatch(name, pattern):
            out.update(values)
    return out
