"""The complete example of docs/adding-a-model.md runs as written: it registers, trains through
the one loop (with its validation pass), predicts and round-trips its weights."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from tiny import fit_on, normal_images, with_defect

from adlib.models import registry

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-model.md"


def test_the_adding_a_model_example_works():
    code = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 - our own documentation
    try:
        model = registry.create_model("feature-ae-example", pretrained=False)
        report = fit_on(model, normal_images(8, 64), validation=normal_images(3, 64, seed=5), num_epochs=3)
        assert report.passes == {"map_scale": 3} and report.loss_history[-1] < report.loss_history[0]
        assert float(model.map_scale) != 1.0
        test = torch.cat([normal_images(2, 64, seed=7), with_defect(normal_images(2, 64, seed=7))])
        out = model.predict(test)
        assert out.maps.shape == (4, 64, 64) and float(out.scores[2:].min()) > float(out.scores[:2].max())
        fresh = registry.create_model("feature-ae-example", pretrained=False)
        fresh.load_saved_state(model.saved_state())
        torch.testing.assert_close(fresh.eval().predict(test).scores, out.scores, rtol=0, atol=0)
    finally:
        registry._REGISTRY.pop("feature-ae-example", None)
