"""Fold a frozen network's batch norms into the convolutions before them.

In evaluation mode a batch norm is a fixed per-channel affine map, so ``bn(conv(x))`` equals
one convolution with scaled weights and a bias. Folded, a frozen backbone skips one pass over
every activation and never holds a convolution's output and its normalised copy at once (the
largest of them, 32 images of 256 px in Lite0's first stage, is 200 MB each). The maps agree
with the unfolded network's to float32 rounding.

Which convolution feeds which batch norm is observed on one small probe forward (the norm's
input must be the very tensor the convolution returned); the folded network is then checked
against the original on that probe and left unfolded if they differ.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

#: the probe image: small, but large enough for the stride-32 stages of the backbones used
PROBE_SIZE = 64
#: largest difference (relative to the output's scale) a folded network may show on the probe
TOLERANCE = 1e-4


class _AfterNorm(nn.Module):
    """What a fused norm + activation layer (timm's ``BatchNormAct2d``) does after normalising."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def fold_batchnorms(model: nn.Module, channels: int = 3) -> int:
    """Fold every eval-mode 2-d batch norm that directly follows a convolution into it, in
    place; returns how many were folded (0 when the check on the probe fails)."""
    if (model.training or any(p.is_meta for p in model.parameters())
            or not any(isinstance(m, _BatchNorm) for m in model.modules())):
        return 0
    probe = torch.rand(1, channels, PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    try:
        pairs, want = _conv_norm_pairs(model, probe)
    except (RuntimeError, ValueError, AssertionError) as error:  # e.g. a network with a fixed input size
        log.debug("batch norms of %s not folded: the probe forward failed (%s)", type(model).__name__, error)
        return 0
    if not pairs:
        return 0
    with torch.no_grad():
        backup = [(conv.bias, conv.weight.detach().clone()) for conv, *_ in pairs]
        for conv, norm, parent, name in pairs:
            _fold(conv, norm)
            setattr(parent, name, _AfterNorm(norm))
        got = _flat_outputs(model(probe))
    scale = max(float(w.abs().max()) for w in want) or 1.0
    if len(got) == len(want) and all(g.shape == w.shape and float((g - w).abs().max()) <= TOLERANCE * scale
                                      for g, w in zip(got, want)):
        return len(pairs)
    log.warning("folding batch norms changed %s's outputs on the probe; left unfolded", type(model).__name__)
    for (conv, norm, parent, name), (bias, weight) in zip(pairs, backup):
        setattr(parent, name, norm)
        conv.weight.data.copy_(weight)
        conv.bias = bias
    return 0


def _conv_norm_pairs(model: nn.Module, probe: torch.Tensor
                     ) -> tuple[list[tuple[nn.Conv2d, _BatchNorm, nn.Module, str]], list[torch.Tensor]]:
    """(conv, norm, norm's parent, norm's attribute name) for norms fed by a conv's output, and
    the model's outputs on the probe."""
    outputs: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    fed: dict[_BatchNorm, nn.Conv2d] = {}
    seen_convs: dict[nn.Conv2d, int] = {}

    def after_conv(conv, _inputs, output):
        outputs[id(output)] = (conv, output)
        seen_convs[conv] = seen_convs.get(conv, 0) + 1

    def before_norm(norm, inputs):
        hit = outputs.get(id(inputs[0]))
        once = norm not in fed  # a norm applied twice is left alone
        fed[norm] = hit[0] if once and hit is not None and hit[1] is inputs[0] else None

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_norm) for m in model.modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
    try:
        with torch.no_grad():
            outputs_on_probe = _flat_outputs(model(probe))
    finally:
        for hook in hooks:
            hook.remove()
    feeders = [conv for conv in fed.values() if conv is not None]
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    pairs = [(conv, norm, *parents[id(norm)]) for norm, conv in fed.items()
             if conv is not None and feeders.count(conv) == 1 and seen_convs[conv] == 1 and id(norm) in parents]
    return pairs, outputs_on_probe


def _fold(conv: nn.Conv2d, norm: _BatchNorm) -> None:
    scale = norm.weight.detach() if norm.affine else torch.ones_like(norm.running_var)
    scale = scale / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias.detach() if norm.affine else torch.zeros_like(norm.running_mean)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.data.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))))
    conv.bias = nn.Parameter(shift + (bias - norm.running_mean) * scale, requires_grad=False)


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in _flat_outputs(item)]
