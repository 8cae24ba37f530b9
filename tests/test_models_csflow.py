"""CS-Flow: the cross-scale flow is exactly invertible with a per-sample log-Jacobian; the model
trains through the one loop with its registered clipping and refuses bad sizes and layers."""
from __future__ import annotations

import pytest
import torch
from tiny import fit_on, normal_images, with_defect

from adlib.models import create_model, resolve_config
from adlib.models.components.cross_scale_flow import CrossScaleFlow

SHAPES = [(5, 4, 4), (5, 2, 2), (5, 1, 1)]  # channels x grid per scale, each half the previous
SMALL = {"backbone": "tf_efficientnet_lite0", "layer": "blocks.4", "hidden_channels": 16, "coupling_blocks": 2,
         "kernel_sizes": [3, 5]}


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    flow = CrossScaleFlow(5, n_scales=3, blocks=2, hidden=6, kernel_sizes=(3, 5)).double()
    with torch.no_grad():
        for p in flow.parameters():  # gates start at 0 (identity): make every block do something
            p.normal_(std=0.3)
    return flow


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g, dtype=torch.double) for s in SHAPES]


def test_cross_scale_flow_inverts_and_its_log_jacobian_is_exact_per_sample(flow):
    xs = _inputs(2)
    zs, log_jac = flow(xs)
    assert log_jac.shape == (2,)
    for x, back in zip(xs, flow.inverse(zs)):
        torch.testing.assert_close(back, x)

    def forward_flat(flat):  # one sample, all scales flattened, through the flow
        parts, start = [], 0
        for s in SHAPES:
            n = s[0] * s[1] * s[2]
            parts.append(flat[start:start + n].view(1, *s))
            start += n
        return torch.cat([z.flatten() for z in flow(parts)[0]])

    for b in range(2):
        jacobian = torch.autograd.functional.jacobian(forward_flat, torch.cat([x[b].flatten() for x in xs]),
                                                    vectorize=True)
        assert float(torch.linalg.slogdet(jacobian).logabsdet) == pytest.approx(float(log_jac[b].detach()),
                                                                                 abs=1e-9)


def test_log_jacobian_of_a_sample_ignores_the_rest_of_the_batch(flow):
    xs, others = _inputs(1), _inputs(3, seed=1)
    _, alone = flow(xs)
    _, together = flow([torch.cat([x, o]) for x, o in zip(xs, others)])
    torch.testing.assert_close(together[0], alone[0])
    assert not torch.allclose(together[1:], together[:1].expand(3))  # per sample, not one batch total


def test_csflow_registered_defaults_are_the_papers():
    config = resolve_config("csflow")
    assert config.model["backbone"] == "tf_efficientnet_b5" and config.model["layer"] == "blocks.5"
    assert config.model["kernel_sizes"] == [3, 3, 3, 5] and config.model["hidden_channels"] == 1024
    train = config.train
    assert (train["img_size"], train["batch_size"], train["num_epochs"], train["grad_clip_norm"]) == (768, 16, 240, 1.0)


def test_csflow_trains_and_scores_defects_higher():
    torch.manual_seed(0)
    model = create_model("csflow", pretrained=False, **SMALL)
    assert model.size_multiple == 64  # stride 16 at three scales
    report = fit_on(model, normal_images(4, 64), batch_size=4, num_epochs=None, max_steps=3, grad_clip_norm=1.0)
    assert report.optimizer_steps == 3 and report.loss_terms["loss"][-1] < report.loss_terms["loss"][0]
    images = torch.cat([normal_images(2, 64, seed=3), with_defect(normal_images(2, 64, seed=3))])
    out = model.eval().predict(images)
    assert out.maps.shape == (4, 64, 64) and out.scores.shape == (4,)
    assert out.scores[2:].min() > out.scores[:2].max()  # random-init backbone, 3 steps: still separates
    zs, _ = model.latents(images[:1])  # the score: mean of z^2 / 2 over all latents of the image
    torch.testing.assert_close(out.scores[0], torch.cat([z.flatten() for z in zs]).square().mean() / 2)


def test_csflow_bad_layer_size_and_kernels_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match=r"layer 'blocks.5' is not a stage of backbone 'resnet18'; valid layers: "
                                         r"layer1, layer2, layer3, layer4"):
        create_model("csflow", pretrained=False, backbone="resnet18")
    with pytest.raises(ValueError, match=r"one entry per coupling block \(4\); got \[3, 5\]"):
        create_model("csflow", pretrained=False, backbone="tf_efficientnet_lite0", kernel_sizes=[3, 5])
    model = create_model("csflow", pretrained=False, backbone="tf_efficientnet_lite0")
    with pytest.raises(ValueError, match=r"multiples of 128; got 96x96.*img_size"):
        model.predict(normal_images(1, 96))
