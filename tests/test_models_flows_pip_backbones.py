"""Every flow configuration that takes a CNN runs with the pip-installed EfficientNet-Lite0 and
MobileNetV2 weights (no backbone directory needed): builds offline, predicts finite maps."""
from __future__ import annotations

import pytest
import torch

from adlib.models import create_model

CASES = [
    ("cflow", {"backbone": "tf_efficientnet_lite0", "coupling_blocks": 1}, 64),
    ("csflow", {"backbone": "mobilenetv2_100", "hidden_channels": 8, "coupling_blocks": 1, "kernel_sizes": [5]}, 128),
    ("uflow-resnet18", {"backbone": "tf_efficientnet_lite0", "flow_steps": 1}, 64),
]


@pytest.mark.parametrize("name, overrides, size", CASES, ids=[f"{c[0]}-{c[1]['backbone']}" for c in CASES])
def test_flow_configuration_runs_on_pip_weights(name, overrides, size):
    model = create_model(name, **overrides).eval()  # pretrained=True: offline pip weights
    assert model.extractor.weights_provenance["source"].startswith("pip:")
    out = model.predict(torch.rand(2, 3, size, size))
    assert out.maps.shape == (2, size, size) and torch.isfinite(out.maps).all() and torch.isfinite(out.scores).all()
