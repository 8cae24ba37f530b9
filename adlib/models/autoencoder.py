"""Convolutional autoencoder baseline.

The classic reconstruction baseline for anomaly detection (e.g. Bergmann et al., "Improving
Unsupervised Defect Segmentation by Applying Structural Similarity to Autoencoders", VISAPP 2019,
whose L2 variant this is): an encoder of stride-2 convolutions compresses the image to a small
spatial code (``latent_channels`` at 1/16 of the input side), a mirrored decoder reconstructs it,
and training minimises the mean squared error on normal images. Anomalies reconstruct poorly.

Anomaly map: per-pixel squared error averaged over the colour channels, optionally smoothed by a
Gaussian (``blur_sigma``). Image score: the map's maximum (``score="max"``) or the mean of its
``topk`` highest fraction of pixels (``score="topk_mean"``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.base import AnomalyModel, AnomalyOutput, Step, TrainBatch
from adlib.models.components.maps import gaussian_blur2d, max_score
from adlib.models.registry import ModelSpec, TrainDefaults, register

SCORES = ("max", "topk_mean")


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.2, inplace=True))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.2, inplace=True))


class Autoencoder(AnomalyModel):
    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256), latent_channels: int = 32,
                 blur_sigma: float = 4.0, score: str = "max", topk: float = 0.01, lr: float = 1e-3,
                 weight_decay: float = 1e-5, normalize: bool = False) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}; got {score!r}")
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk is a fraction of pixels in (0, 1]; got {topk}")
        super().__init__(normalize=normalize)
        chans = [3, *[int(c) for c in channels]]
        self.encoder = nn.Sequential(*(_down(a, b) for a, b in zip(chans[:-1], chans[1:])),
                                     nn.Conv2d(chans[-1], int(latent_channels), 1))
        rev = chans[::-1]
        self.decoder = nn.Sequential(nn.Conv2d(int(latent_channels), rev[0], 1), nn.LeakyReLU(0.2, inplace=True),
                                     *(_up(a, b) for a, b in zip(rev[:-2], rev[1:-1])),
                                     nn.ConvTranspose2d(rev[-2], 3, 4, stride=2, padding=1))
        self.size_multiple = 2 ** len(channels)
        self.blur_sigma, self.score, self.topk = float(blur_sigma), score, float(topk)
        self.lr, self.weight_decay = float(lr), float(weight_decay)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x)
        return self.decoder(self.encoder(x))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        x = self.normalize_input(batch.images)
        return F.mse_loss(self.reconstruct(x).float(), x.float())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        x = self.normalize_input(images)
        maps = (self.reconstruct(x).float() - x.float()).square().mean(dim=1)
        maps = gaussian_blur2d(maps, self.blur_sigma)
        if self.score == "max":
            scores = max_score(maps)
        else:
            k = max(int(round(self.topk * maps[0].numel())), 1)
            scores = maps.flatten(1).topk(k, dim=1).values.mean(dim=1)
        return AnomalyOutput(scores=scores, maps=maps)


register(ModelSpec(
    name="autoencoder", cls=Autoencoder, family="reconstruction",
    paper="Convolutional autoencoder baseline (L2 reconstruction); cf. Bergmann et al., Improving Unsupervised "
          "Defect Segmentation by Applying Structural Similarity to Autoencoders, VISAPP 2019",
    train=TrainDefaults(num_epochs=50, batch_size=32, img_size=256),
    description="stride-2 conv encoder/decoder; squared reconstruction error maps"))
