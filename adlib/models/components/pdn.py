"""EfficientAD's networks (Batzner, Heckler, Koenig, WACV 2024, arXiv:2303.14535, Tables 6-8):
the patch description network (PDN) that is the teacher and the student, and the autoencoder.

A PDN is four (small) or six (medium) convolutions with two 2x2 average poolings; every output
feature describes a 33x33 patch. ``padding=True`` is the paper's table (a 256 px image gives a
64x64 map); ``padding=False`` (the reference code's default) drops the paddings and loses 4
cells at each border of the map (256 px -> 56x56). The convolutions are named ``conv1`` ..
``convN`` in both cases, so the same weight file fits either.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.components.pdn_sizes import PDN_SIZES, check_size  # noqa: F401 (re-exported)

#: cells lost at each border of a PDN map without padding (the same for both sizes)
UNPADDED_BORDER = 4


class Layer(NamedTuple):
    """A convolution (``channels`` None = the network's output channels) or a 2x2/2 average pooling."""

    kind: str  # "conv" or "pool"
    channels: int | None = None
    kernel: int = 2
    padding: int = 0  # with padding=True; none without


_POOL = Layer("pool", kernel=2, padding=1)
#: both layouts start with conv1 (ReLU) and a pooling: the layers a teacher and its student can share a pass of
LAYOUTS: dict[str, tuple[Layer, ...]] = {
    "small": (Layer("conv", 128, 4, 3), _POOL, Layer("conv", 256, 4, 3), _POOL, Layer("conv", 256, 3, 1),
              Layer("conv", None, 4, 0)),
    "medium": (Layer("conv", 256, 4, 3), _POOL, Layer("conv", 512, 4, 3), _POOL, Layer("conv", 512, 1, 0),
               Layer("conv", 512, 3, 1), Layer("conv", None, 4, 0), Layer("conv", None, 1, 0)),
}


STEM = 2


class PatchDescriptionNetwork(nn.Module):
    """PDN-S or PDN-M with ``out_channels`` outputs (teacher 384; student 768: 384 that mimic the
    teacher, 384 that mimic the autoencoder). ReLU after every convolution but the last."""

    def __init__(self, size: str = "small", out_channels: int = 384, padding: bool = False) -> None:
        super().__init__()
        self.size, self.out_channels, self.padding = check_size(size), int(out_channels), bool(padding)
        self.layers = LAYOUTS[size]
        channels, n = 3, 0
        for layer in self.layers:
            if layer.kind == "conv":
                n += 1
                out = self.out_channels if layer.channels is None else layer.channels
                pad = layer.padding if self.padding else 0
                self.add_module(f"conv{n}", nn.Conv2d(channels, out, layer.kernel, padding=pad))
                channels = out
        self.num_convs = n

    @property
    def head(self) -> nn.Conv2d:
        """The last convolution (no activation after it)."""
        return getattr(self, f"conv{self.num_convs}")

    def trunk(self, x: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """Everything before :attr:`head` (the input of the last convolution); ``x`` has been
        through the first ``skip`` layers already (e.g. :data:`STEM`)."""
        n = sum(layer.kind == "conv" for layer in self.layers[:skip])
        for layer in self.layers[skip:]:
            if layer.kind == "pool":
                x = F.avg_pool2d(x, 2, 2, padding=layer.padding if self.padding else 0)
                continue
            n += 1
            if n == self.num_convs:
                return x
            x = F.relu(getattr(self, f"conv{n}")(x), inplace=True)
        raise AssertionError("a PDN ends with a convolution")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def output_side(self, side: int) -> int:
        """Side of the output map for an input side (a ValueError for images smaller than a patch)."""
        out = int(side)
        for layer in self.layers:
            pad = layer.padding if self.padding else 0
            out = (out + 2 * pad - layer.kernel) // (2 if layer.kind == "pool" else 1) + 1
        if out < 1:
            raise ValueError(f"images of {side} px are too small for EfficientAD's PDN (33x33 px patches): "
                             "use img_size >= 33 (the paper: 256)")
        return out


def pdn_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PDN's weights in this module's names: ``conv1.weight`` ... as they are (anomalib's
    release files), or an ``nn.Sequential`` layout (``0.weight``, ``3.weight`` ...; the reference
    code's files), whose convolutions are renumbered in order."""
    if any(key.startswith("conv") for key in state):
        return dict(state)
    indices = sorted({int(key.split(".", 1)[0]) for key in state if key.split(".", 1)[0].isdigit()})
    if not indices or len(indices) * 2 != len(state):
        return dict(state)  # unknown layout: the strict load names the keys
    rename = {index: f"conv{n}" for n, index in enumerate(indices, start=1)}
    return {f"{rename[int(key.split('.', 1)[0])]}.{key.split('.', 1)[1]}": value for key, value in state.items()}


class Autoencoder(nn.Module):
    """EfficientAD's autoencoder: six strided convolutions down to a 1x1 code of 64 channels,
    then bilinear resizes and convolutions back up to the PDN's map size.

    At 256 px the decoder resizes to 3, 8, 15, 32, 63 and 127 cells (the paper); at other sizes
    these scale with the input side, and the encoder's last 8x8 input is reached by adaptive
    average pooling, so any image size works with the same weights.
    """

    DECODER_SIDES = (3, 8, 15, 32, 63, 127)  # at REFERENCE_SIDE
    REFERENCE_SIDE = 256
    CODE_SIDE = 8

    def __init__(self, out_channels: int = 384, dropout: float = 0.2) -> None:
        super().__init__()
        widths = (32, 32, 64, 64, 64)
        self.encoder = nn.ModuleList(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
                                     for c_in, c_out in zip((3,) + widths[:-1], widths))
        self.code = nn.Conv2d(64, 64, self.CODE_SIDE)
        self.decoder = nn.ModuleList(nn.Conv2d(64, 64, 4, padding=2) for _ in self.DECODER_SIDES)
        self.dropout = nn.Dropout(dropout)
        self.refine = nn.Conv2d(64, 64, 3, padding=1)
        self.out = nn.Conv2d(64, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        h, w = x.shape[-2:]
        for conv in self.encoder:
            x = F.relu(conv(x), inplace=True)
        if tuple(x.shape[-2:]) != (self.CODE_SIDE, self.CODE_SIDE):
            x = F.adaptive_avg_pool2d(x, self.CODE_SIDE)
        x = self.code(x)
        for side, conv in zip(self.DECODER_SIDES, self.decoder):
            size = (max(1, round(side * h / self.REFERENCE_SIDE)), max(1, round(side * w / self.REFERENCE_SIDE)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x), inplace=True))
        x = F.interpolate(x, size=tuple(int(s) for s in output_size), mode="bilinear", align_corners=False)
        return self.out(F.relu(self.refine(x), inplace=True))


#: safetensors metadata key of a distilled teacher's provenance record (JSON)
TEACHER_RECORD_KEY = "adlib_teacher"


def teacher_name(size: str) -> str:
    """Catalog name of the distilled PDN teacher of a size (adlib.backbones.catalog)."""
    return f"efficientad_teacher_{check_size(size)}"


def seeded(factory, seed: int) -> nn.Module:
    """``factory()`` with PyTorch's default initialisation drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return factory()


__all__ = ["Autoencoder", "LAYOUTS", "PDN_SIZES", "PatchDescriptionNetwork", "TEACHER_RECORD_KEY", "UNPADDED_BORDER",
           "STEM", "check_size", "pdn_state_dict", "seeded", "teacher_name"]
