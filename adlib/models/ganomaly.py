"""GANomaly: an adversarially trained encoder-decoder-encoder (image-level scores only).

Akcay, Atapour-Abarghouei, Breckon, "GANomaly: Semi-Supervised Anomaly Detection via Adversarial
Training", ACCV 2018 (arXiv:1805.06725).

The generator encodes an image to a latent vector ``z`` (DCGAN encoder), decodes it to a
reconstruction ``x_hat`` (DCGAN decoder, tanh output) and encodes that again to ``z_hat`` (a second
encoder of the same shape). A DCGAN discriminator tells images from reconstructions. Generator
loss: ``w_adv * L_adv + w_con * |x - x_hat|_1 + w_enc * |z - z_hat|_2^2`` with the feature-matching
adversarial loss ``L_adv = |f(x) - f(x_hat)|_2^2`` on the discriminator's last feature map;
discriminator loss: binary cross-entropy of real images against reconstructions (halved). The
two are stepped in turn every batch by the loop (generator on ``"g_loss"``, then discriminator on
``"d_loss"``). As in the authors' code, the discriminator is re-initialised when its loss falls
below ``d_reset_threshold``.

Score: the latent distance ``mean((z - z_hat)^2)``. There is no anomaly map (``produces_maps`` is
False). Scores are divided by a fixed scale, the median score of the held-out normal validation
images (an "after" data pass), never by statistics of the evaluated images.

Image size: the DCGAN pyramid halves the side down to 4 pixels, so it needs a power of two. The
network is built for the next power of two at or above ``img_size`` and inputs are padded to it
(symmetrically, with zeros after normalisation, i.e. mid-grey); the padding is the same for every
image, so it shifts no ranking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.base import AnomalyModel, AnomalyOutput, DataPass, OptimizerSpec, Step, TrainBatch
from adlib.models.components.init import normal_init_
from adlib.models.registry import ModelSpec, TrainDefaults, register

#: smallest network side: the pyramid needs at least one stride-2 stage above its 4x4 end
MIN_SIDE = 16


def next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def dcgan_encoder(side: int, width: int, out_dim: int, extra_layers: int = 0, final_conv: bool = True,
                  in_channels: int = 3) -> nn.Sequential:
    """Stride-2 4x4 convolutions doubling the width from ``width`` until the map is 4x4, then a
    4x4 valid convolution to ``out_dim`` channels (a ``[B, out_dim, 1, 1]`` code)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    for _ in range(extra_layers):
        layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True)]
    size, c = side // 2, width
    while size > 4:
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, inplace=True)]
        size, c = size // 2, 2 * c
    if final_conv:
        layers.append(nn.Conv2d(c, out_dim, 4, 1, 0, bias=False))
    return nn.Sequential(*layers)


def dcgan_decoder(side: int, width: int, in_dim: int, extra_layers: int = 0, out_channels: int = 3) -> nn.Sequential:
    """The mirror of :func:`dcgan_encoder`: a 4x4 map from the code, stride-2 transposed
    convolutions halving the width up to the full side, tanh output."""
    c = width * side // 8  # the encoder's width at its 4x4 stage
    layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
    size = 4
    while size < side // 2:
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
        size, c = size * 2, c // 2
    for _ in range(extra_layers):
        layers += [nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
    layers += [nn.ConvTranspose2d(c, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """A DCGAN encoder to one logit; ``features`` is its last 4x4 feature map (feature matching)."""

    def __init__(self, side: int, width: int, extra_layers: int = 0) -> None:
        super().__init__()
        layers = list(dcgan_encoder(side, width, 1, extra_layers, final_conv=True))
        self.features = nn.Sequential(*layers[:-1])
        self.classifier = layers[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier(features).flatten(), features


class Ganomaly(AnomalyModel):
    produces_maps = False
    data_passes = (DataPass("score_scale", "after", "validation"),)

    def __init__(self, n_features: int = 64, latent_dim: int = 100, extra_layers: int = 0,
                 add_final_conv: bool = True, w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0,
                 lr: float = 2e-4, beta1: float = 0.5, beta2: float = 0.999, d_reset_threshold: float = 1e-5,
                 normalize: bool = True, img_size: int = 256) -> None:
        if int(img_size) < MIN_SIDE:
            raise ValueError(f"GANomaly needs images of at least {MIN_SIDE} px (its DCGAN pyramid halves the side "
                             f"down to 4); got img_size={img_size}")
        if not add_final_conv:
            raise ValueError("add_final_conv=False leaves GANomaly's latent as a 4x4 feature map, which its "
                             "decoder cannot take; use add_final_conv=True")
        super().__init__(normalize=normalize, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # [-1, 1], as tanh
        self.img_size = int(img_size)
        self.side = next_power_of_two(self.img_size)
        width, dim, extra = int(n_features), int(latent_dim), int(extra_layers)
        self.encoder = dcgan_encoder(self.side, width, dim, extra)
        self.decoder = dcgan_decoder(self.side, width, dim, extra)
        self.reencoder = dcgan_encoder(self.side, width, dim, extra)
        self.discriminator = Discriminator(self.side, width, extra)
        for net in (self.encoder, self.decoder, self.reencoder, self.discriminator):
            normal_init_(net)
        self.w_adv, self.w_con, self.w_enc = float(w_adv), float(w_con), float(w_enc)
        self.lr, self.betas = float(lr), (float(beta1), float(beta2))
        self.d_reset_threshold = float(d_reset_threshold)
        self.register_buffer("score_scale", torch.ones(()))
        self.discriminator_resets = 0
        self._last_d_loss: torch.Tensor | None = None
        self._validation_scores: list[torch.Tensor] = []

    # ----- input ---------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise to [-1, 1] and pad to the network's power-of-two side (refusing other sizes)."""
        h, w = images.shape[-2:]
        if (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"this GANomaly was built for {self.img_size}x{self.img_size} images; got {h}x{w}. "
                             f"Resize the images to {self.img_size} px (the training img_size)")
        x = self.normalize_input(images)
        extra = self.side - self.img_size
        if extra:
            x = F.pad(x, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))
        return x

    def generate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, x_hat, z_hat)`` of prepared images."""
        z = self.encoder(x)
        fake = self.decoder(z)
        return z, fake, self.reencoder(fake)

    # ----- training --------------------------------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.reencoder.parameters()]

    def configure_optimizers(self) -> list[OptimizerSpec]:
        g_opt = torch.optim.Adam(self.generator_parameters(), lr=self.lr, betas=self.betas)
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas)
        return [OptimizerSpec(g_opt, loss="g_loss"), OptimizerSpec(d_opt, loss="d_loss")]

    def _maybe_reset_discriminator(self, step: Step) -> torch.Tensor:
        """Re-initialise the discriminator when its last loss fell below the threshold (it has
        won: its gradients would vanish for the generator). Returns 1.0 when it did."""
        last, self._last_d_loss = self._last_d_loss, None
        if not self.training or last is None or float(last) >= self.d_reset_threshold:
            return torch.zeros(())
        seed = (self.fit_context.seed if self.fit_context is not None else 0) * 100003 + step.index
        normal_init_(self.discriminator, generator=torch.Generator().manual_seed(seed))
        self.discriminator_resets += 1
        return torch.ones(())

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        reset = self._maybe_reset_discriminator(step)
        x = self.prepare(batch.images)
        z, fake, z_hat = self.generate(x)
        real_logit, real_features = self.discriminator(x)
        _, fake_features = self.discriminator(fake)
        adv = F.mse_loss(fake_features.float(), real_features.float())
        con = F.l1_loss(fake.float(), x.float())
        enc = F.mse_loss(z_hat.float(), z.float())
        g_loss = self.w_adv * adv + self.w_con * con + self.w_enc * enc
        fake_logit, _ = self.discriminator(fake.detach())
        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logit.float(), torch.ones_like(real_logit.float()))
                        + F.binary_cross_entropy_with_logits(fake_logit.float(), torch.zeros_like(fake_logit.float())))
        if self.training:  # not a validation loss (eval mode)
            self._last_d_loss = d_loss.detach()
        return {"g_loss": g_loss, "d_loss": d_loss, "loss": g_loss.detach(), "adv": adv.detach(),
                "con": con.detach(), "enc": enc.detach(), "d_reset": reset}

    # ----- score scale (after training, over held-out normal images) --------------------------
    def latent_distance(self, images: torch.Tensor) -> torch.Tensor:
        z, _, z_hat = self.generate(self.prepare(images))
        return (z.float() - z_hat.float()).square().flatten(1).mean(dim=1)

    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        self._validation_scores.append(self.latent_distance(batch.images))

    def end_pass(self, pass_name: str) -> None:
        scores = torch.cat(self._validation_scores)
        self._validation_scores = []
        self.score_scale = scores.median().clamp_min(1e-12).to(self.score_scale)

    def provenance(self) -> dict:
        return {"ganomaly_discriminator_resets": self.discriminator_resets}

    # ----- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        return AnomalyOutput(scores=self.latent_distance(images) / self.score_scale, maps=None)


register(ModelSpec(
    name="ganomaly", cls=Ganomaly, family="reconstruction",
    paper="Akcay, Atapour-Abarghouei, Breckon, GANomaly: Semi-Supervised Anomaly Detection via Adversarial "
          "Training, ACCV 2018, arXiv:1805.06725",
    train=TrainDefaults(num_epochs=15, batch_size=64, img_size=256, validation_fraction=0.1),
    description="DCGAN encoder-decoder-encoder + discriminator, trained in turn; latent-distance image score "
                "(no anomaly map)"))
