"""DSR: dual subspace re-projection.

Zavrtanik, Kristan, Skočaj, "DSR - A Dual Subspace Re-Projection Network for Surface Anomaly
Detection", ECCV 2022 (arXiv:2208.01521).

A frozen vector-quantised *general appearance model* (stage 1, :mod:`adlib.models.components.vq`)
turns an image into two quantised feature maps (``lo`` at 1/8, ``hi`` at 1/4 of the side) and
decodes them back. DSR then trains, in two phases of the one loop:

* ``"restriction"`` (first 70 % of the steps): near-in-distribution anomalies are made *in the
  quantised latent space*: inside Perlin masks the code vectors are replaced by codes drawn from
  the ranks ``(5 %, strength]`` of the codebook sorted by distance to the continuous feature
  (``strength ~ U[latent_anomaly_strength, 1]``; on lo, hi or both levels). Two subspace restriction
  networks (encoder-decoders without skips, one per level) learn to map the features back to the
  normal ones (L2 to the real quantised maps); their outputs, quantised again, feed the
  *object-specific decoder* (L2 to the image, weight ``image_loss_weight``); the *anomaly
  detection module* (a U-Net) segments the anomaly from the object-specific and the general
  reconstruction (focal loss).
* ``"upsampling"`` (last 30 %): everything above is fixed and the *upsampling module* (a U-Net on
  both reconstructions and the detection mask) learns full-resolution masks of image-space
  anomalies: Perlin regions filled with a uniform random colour (focal loss).

Prediction: the anomaly map is the upsampling module's anomaly probability; the image score is
the maximum of the detection module's anomaly probability averaged over 21 x 21 windows.

The general appearance model is a file in the backbone directory (catalog name ``dsr_vq_model``:
the authors' ``vq_model_pretrained_128_4096.pckl``, or one trained offline with ``adlib backbones
train-dsr-vq``); ``pretrained=False`` gives a seeded random one, for tests only.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.base import AnomalyModel, AnomalyOutput, FitContext, OptimizerSpec, Step, TrainBatch
from adlib.models.components import blocks
from adlib.models.components.focal_loss import focal_loss
from adlib.models.components.init import normal_init_
from adlib.models.components.kmeans import squared_distances
from adlib.models.components.maps import max_score
from adlib.models.components.perlin import random_perlin_mask
from adlib.models.components.synthesis import AnomalySynthesizer
from adlib.models.components.vq import GeneralAppearanceModel, ImageDecoder
from adlib.models.registry import ModelSpec, TrainDefaults, register

#: provenance of a general appearance model built with pretrained=False
RANDOM_GENERAL = "random-init (pretrained=False): for tests only, results are not meaningful"
#: blending weight of the colour in phase-2 image anomalies (the authors' code: 1 - U[0, 0.8])
COLOUR_OPACITY = (0.2, 1.0)


def conv_block(c_in: int, c_out: int, c_mid: int | None = None) -> nn.Sequential:
    """conv3x3-InstanceNorm-ReLU twice."""
    return blocks.conv_block(c_in, c_out, c_mid, norm=nn.InstanceNorm2d)


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Bilinear x2 upsampling, then conv3x3-InstanceNorm-ReLU."""
    return blocks.up_block(c_in, c_out, norm=nn.InstanceNorm2d)


class RestrictionNetwork(nn.Module):
    """Subspace restriction: encoder (widths w, 2w, 4w; two poolings) and decoder without skip
    connections, from and to ``channels`` feature channels."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        w = width
        self.encoder = nn.ModuleList([conv_block(channels, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w)])
        self.decoder = nn.Sequential(up_block(4 * w, 2 * w), conv_block(2 * w, 2 * w),
                                     up_block(2 * w, w), conv_block(w, w), nn.Conv2d(w, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        return self.decoder(x)


def unet(in_channels: int, out_channels: int, width: int) -> blocks.UNet:
    """The detection and upsampling modules' U-Net: widths w, 2w, 4w, 4w (three poolings),
    InstanceNorm, skip connections."""
    w = width
    return blocks.UNet(in_channels, out_channels, (w, 2 * w, 4 * w, 4 * w), (4 * w, 2 * w, w), norm=nn.InstanceNorm2d,
                       up_to_decoder_width=True)


class ObjectDecoder(nn.Module):
    """Object-specific image decoder: joined quantised maps (hi grid) -> two conv blocks with
    poolings -> a ``bottleneck``-channel code -> two transposed convolutions back to the hi grid ->
    the general decoder's architecture up to the image."""

    def __init__(self, channels: int, hidden: int, residual_hidden: int, residual_layers: int,
                 bottleneck: int) -> None:
        super().__init__()
        c = channels
        self.encoder = nn.ModuleList([conv_block(c, 2 * c, c_mid=c), conv_block(2 * c, 4 * c, c_mid=2 * c)])
        self.to_code = nn.Conv2d(4 * c, bottleneck, 1)
        self.from_code = nn.ModuleList([nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1)
                                        for _ in range(2)])
        self.image = ImageDecoder(bottleneck, hidden, residual_hidden, residual_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder:
            x = F.max_pool2d(block(x), 2)
        x = self.to_code(x)
        for up in self.from_code:
            x = F.relu(up(x))
        return self.image(x)


def replace_with_distant_codes(z: torch.Tensor, q: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor,
                               strength: torch.Tensor, generator: torch.Generator,
                               skip_fraction: float = 0.05) -> torch.Tensor:
    """DSR's latent anomalies: inside ``mask`` (``[B, 1, h, w]``) replace the quantised vectors
    ``q`` by random codes among the ``strength * K`` codes nearest to the continuous features
    ``z``, skipping the nearest ``skip_fraction * K`` (too similar to be anomalous)."""
    out = q.clone()
    k_total = codebook.shape[0]
    skip = int(k_total * skip_fraction)
    for i in range(q.shape[0]):
        where = mask[i, 0].flatten().nonzero().flatten()
        if where.numel() == 0:
            continue
        rows = z[i].flatten(1).T[where].float()
        k = max(1, min(int(float(strength[i]) * k_total) + 1, k_total - 1 if k_total > 1 else 1))
        order = squared_distances(rows, codebook.float()).topk(k, dim=1, largest=False).indices
        if k > skip:
            order = order[:, skip:]
        pick = torch.randint(order.shape[1], (order.shape[0], 1), generator=generator).to(order.device)
        chosen = order.gather(1, pick)[:, 0]
        out[i].view(q.shape[1], -1)[:, where] = codebook[chosen].T.to(out.dtype)
    return out


class Dsr(AnomalyModel):
    phases = (("restriction", 0.7), ("upsampling", 0.3))
    frozen_modules = ("general",)
    #: input sides must be multiples of this (lo grid at 1/8, pooled twice more by the restriction network)
    size_multiple = 32
    #: smallest side: the restriction network's deepest map must have more than one position
    min_side = 64

    def __init__(self, num_embeddings: int = 4096, embedding_dim: int = 128, hidden: int = 128,
                 residual_layers: int = 2, residual_hidden: int = 64, restriction_width: int = 128,
                 detector_width: int = 64, decoder_bottleneck: int = 64, latent_anomaly_strength: float = 0.2,
                 skip_nearest_fraction: float = 0.05, anomaly_probability: float = 0.5,
                 image_loss_weight: float = 10.0, focal_gamma: float = 2.0, score_pool_size: int = 21,
                 lr: float = 2e-4, lr_milestone: float = 0.8, lr_gamma: float = 0.1, normalize: bool = False,
                 pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        if not 0.0 <= latent_anomaly_strength <= 1.0:
            raise ValueError(f"latent_anomaly_strength is a fraction of the codebook in [0, 1]; "
                             f"got {latent_anomaly_strength}")
        super().__init__(normalize=normalize)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random general model is the same in every process (reloads match)
            self.general = GeneralAppearanceModel(hidden, residual_layers, residual_hidden, num_embeddings,
                                                  embedding_dim)
        if pretrained:
            from adlib.backbones.dsr_vq import load_general_appearance

            self.general_provenance = load_general_appearance(self.general, backbone_dir)
        else:
            self.general_provenance = {"backbone": "dsr_vq_model", "source": RANDOM_GENERAL, "sha256": None}
        self.general.eval()
        self.general.requires_grad_(False)
        d = int(embedding_dim)
        self.restrict_hi = RestrictionNetwork(d, int(restriction_width))
        self.restrict_lo = RestrictionNetwork(d, int(restriction_width))
        self.object_decoder = normal_init_(ObjectDecoder(2 * d, int(hidden), int(residual_hidden),
                                                         int(residual_layers), int(decoder_bottleneck)))
        self.detector = normal_init_(unet(6, 2, int(detector_width)))
        self.upsampler = unet(8, 2, int(detector_width))
        self.strength, self.skip_fraction = float(latent_anomaly_strength), float(skip_nearest_fraction)
        self.anomaly_probability = float(anomaly_probability)
        self.image_loss_weight, self.focal_gamma = float(image_loss_weight), float(focal_gamma)
        self.score_pool_size = int(score_pool_size)
        self.lr, self.lr_milestone, self.lr_gamma = float(lr), float(lr_milestone), float(lr_gamma)
        self._generator: torch.Generator | None = None
        self._image_anomalies: AnomalySynthesizer | None = None

    def train(self, mode: bool = True) -> "Dsr":
        super().train(mode)
        self.general.eval()  # frozen: never in training mode
        return self

    def provenance(self) -> dict:
        return {"dsr_general_appearance_model": dict(self.general_provenance)}

    def required_weights(self) -> tuple[str, ...]:
        return ("dsr_vq_model",)

    def check_input_size(self, images: torch.Tensor | tuple[int, int]) -> None:
        super().check_input_size(images)
        h, w = images.shape[-2:] if isinstance(images, torch.Tensor) else images
        if min(h, w) < self.min_side:
            raise ValueError(f"DSR needs image sides of at least {self.min_side} px (its lo features are pooled to "
                             f"1/32 of the side); got {h}x{w}")

    # ----- shared forward pieces ----------------------------------------------------------------
    def object_image(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(object-specific reconstruction, restricted lo, restricted hi features) of quantised maps."""
        r_lo, r_hi = self.restrict_lo(q_lo), self.restrict_hi(q_hi)
        rq_lo, _, _ = self.general.quant_lo(r_lo)  # straight-through: gradients reach the restriction nets
        rq_hi, _, _ = self.general.quant_hi(r_hi)
        return self.object_decoder(self.general.join(rq_lo, rq_hi)), r_lo, r_hi

    def _detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(object-specific reconstruction, general reconstruction, detection probabilities)."""
        q = self.general.quantise(self.normalize_input(images))
        general = self.general.decoder(self.general.join(q["q_lo"], q["q_hi"]))
        specific, _, _ = self.object_image(q["q_lo"], q["q_hi"])
        return specific, general, torch.softmax(self.detector(torch.cat([specific, general], dim=1)).float(), dim=1)

    # ----- training ------------------------------------------------------------------------------
    def setup_fit(self, context: FitContext) -> None:
        super().setup_fit(context)
        self._generator = torch.Generator().manual_seed(int(context.seed))
        self._image_anomalies = AnomalySynthesizer(seed=int(context.seed) + 1, p_anomalous=self.anomaly_probability,
                                                   beta_min=COLOUR_OPACITY[0], beta_max=COLOUR_OPACITY[1],
                                                   fill="colour")

    def configure_optimizers(self) -> list[OptimizerSpec]:
        first = [*self.restrict_hi.parameters(), *self.restrict_lo.parameters(), *self.object_decoder.parameters(),
                 *self.detector.parameters()]
        opt_first = torch.optim.Adam(first, lr=self.lr)
        steps = self.fit_context.total_steps if self.fit_context is not None else 1
        first_steps = round(steps * self.phases[0][1])
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt_first, [max(int(self.lr_milestone * first_steps), 1)],
                                                        gamma=self.lr_gamma)
        opt_up = torch.optim.Adam(self.upsampler.parameters(), lr=self.lr)
        return [OptimizerSpec(opt_first, schedule, interval="step", loss="restriction_loss", phase="restriction"),
                OptimizerSpec(opt_up, loss="upsampling_loss", phase="upsampling")]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        if self._generator is None:
            raise RuntimeError("call setup_fit(FitContext(...)) before training DSR: it seeds the anomaly synthesis")
        self.check_input_size(batch.images)
        if step.phase == "restriction":
            return self._restriction_step(batch.images)
        return self._upsampling_step(batch.images)

    def _latent_anomalies(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Real and anomalous quantised maps of images ``x`` and the target mask (no gradients)."""
        g, gen = self._generator, self.general
        b, _, h, w = x.shape
        masks = torch.zeros(b, 1, h, w, device=x.device)
        for i in range(b):
            if float(torch.rand(1, generator=g)) < self.anomaly_probability:
                masks[i, 0] = random_perlin_mask((h, w), g, device=x.device)
        level = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), b, replacement=True, generator=g).to(x.device)
        strength = self.strength + (1.0 - self.strength) * torch.rand(2, b, generator=g)  # lo, hi
        real = gen.quantise(x)
        lo_scale, hi_scale = h // real["q_lo"].shape[-2], h // real["q_hi"].shape[-2]
        mask_lo, mask_hi = F.max_pool2d(masks, lo_scale), F.max_pool2d(masks, hi_scale)
        on_lo = (level != 2).view(b, 1, 1, 1).float()  # 0: both levels, 1: lo only, 2: hi only
        on_hi = (level != 1).view(b, 1, 1, 1).float()
        lo = replace_with_distant_codes(real["z_lo"], real["q_lo"], gen.quant_lo.codebook, mask_lo * on_lo,
                                        strength[0], g, self.skip_fraction)
        z_hi_over_lo = gen.hi_features(real["enc_hi"], lo)  # "both": hi features of the anomalous lo map
        q_hi_over_lo, _, _ = gen.quant_hi(z_hi_over_lo)
        both = (level == 0).view(b, 1, 1, 1)
        hi = replace_with_distant_codes(torch.where(both, z_hi_over_lo, real["z_hi"]),
                                        torch.where(both, q_hi_over_lo, real["q_hi"]), gen.quant_hi.codebook,
                                        mask_hi * on_hi, strength[1], g, self.skip_fraction)
        target = torch.where((level == 2).view(b, 1, 1, 1), F.interpolate(mask_hi, scale_factor=hi_scale),
                             F.interpolate(mask_lo, scale_factor=lo_scale))
        return {"lo": lo, "hi": hi, "q_lo": real["q_lo"], "q_hi": real["q_hi"], "target": target}

    def _restriction_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize_input(images)
        with torch.no_grad():
            latent = self._latent_anomalies(x)
            general = self.general.decoder(self.general.join(latent["lo"], latent["hi"]))
        specific, r_lo, r_hi = self.object_image(latent["lo"], latent["hi"])
        logits = self.detector(torch.cat([specific.detach(), general], dim=1))
        features = F.mse_loss(r_hi.float(), latent["q_hi"].float()) + F.mse_loss(r_lo.float(), latent["q_lo"].float())
        image = F.mse_loss(specific.float(), x.float())
        focal = focal_loss(logits, latent["target"], gamma=self.focal_gamma)
        total = features + self.image_loss_weight * image + focal
        return {"restriction_loss": total, "loss": total.detach(), "features": features.detach(),
                "image": image.detach(), "focal": focal.detach()}

    def _upsampling_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            augmented, masks = self._image_anomalies(images)
            specific, general, detection = self._detect(augmented)
        logits = self.upsampler(torch.cat([specific, general, detection.to(specific.dtype)], dim=1))
        focal = focal_loss(logits, masks, gamma=self.focal_gamma)
        return {"upsampling_loss": focal, "loss": focal.detach()}

    # ----- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        self.check_input_size(images)
        specific, general, detection = self._detect(images)
        upsampled = self.upsampler(torch.cat([specific, general, detection.to(specific.dtype)], dim=1))
        maps = torch.softmax(upsampled.float(), dim=1)[:, 1]
        k = self.score_pool_size
        pooled = F.avg_pool2d(detection[:, 1:], k, stride=1, padding=k // 2)[:, 0] if k > 1 else detection[:, 1]
        return AnomalyOutput(scores=max_score(pooled), maps=maps)


register(ModelSpec(
    name="dsr", cls=Dsr, family="reconstruction",
    paper="Zavrtanik, Kristan, Skočaj, DSR - A Dual Subspace Re-Projection Network for Surface Anomaly Detection, "
          "ECCV 2022, arXiv:2208.01521",
    train=TrainDefaults(num_epochs=150, batch_size=8, img_size=256),
    description="frozen VQ general appearance model; subspace restriction + object decoder + detection U-Net on "
                "latent-space anomalies, then an upsampling U-Net on image-space Perlin anomalies"))
