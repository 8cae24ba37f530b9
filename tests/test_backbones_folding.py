"""Batch norms folded into the convolutions of frozen networks: same outputs, or left alone."""
from __future__ import annotations

import torch
from torch import nn

from adlib.backbones.folding import fold_batchnorms


def _randomised(model: nn.Module) -> nn.Module:
    """Eval-mode model whose batch norms have non-trivial statistics."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


class ConvOutputReused(nn.Module):
    """The convolution's output feeds the norm and, outside any module, a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class NormOfASum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) + 1.0)


def test_conv_norm_pairs_are_folded_with_the_same_outputs():
    model = _randomised(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8)))
    x = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        want = model(x)
        assert fold_batchnorms(model) == 2
        got = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_conv_output_used_elsewhere_is_left_unfolded():
    model = _randomised(ConvOutputReused())
    x = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        want = model(x)
        assert fold_batchnorms(model) == 0  # the probe shows the change; everything is restored
        assert torch.equal(model(x), want)
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None


def test_norms_not_fed_by_a_convolution_and_training_models_are_left_alone():
    model = _randomised(NormOfASum())
    assert fold_batchnorms(model) == 0 and isinstance(model.bn, nn.BatchNorm2d)
    training = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorms(training) == 0 and isinstance(training[1], nn.BatchNorm2d)
