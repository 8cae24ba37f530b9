"""DRAEM: discriminatively trained reconstruction embedding.

Zavrtanik et al., "DRAEM - A discriminatively trained reconstruction embedding for surface
anomaly detection", ICCV 2021; optional SSPCAB block from Ristea et al., CVPR 2022.

Training sees only normal images. Inside :meth:`Draem.training_step` each batch is turned into
simulated anomalies (Perlin-noise regions filled with augmented textures, see
:mod:`adlib.models.components.synthesis`). The reconstructive sub-network (an encoder-decoder
without skips) learns to restore the clean image; the discriminative sub-network (a U-Net on the
concatenated input and reconstruction) learns to segment the simulated anomaly. Loss:
``L2 + (1 - SSIM)`` on the reconstruction, focal loss (gamma 2) on the mask, plus
``sspcab_lambda * MSE`` of the SSPCAB block when enabled.

Prediction: the anomaly map is the softmax probability of the anomaly channel; the image score is
the maximum of the map smoothed by a 21x21 mean filter (paper, Sec. 3.4).

Textures come from the auxiliary stream ``"textures"`` (a DTD folder under the data root, decoded
by the data layer, one texture per training image). Without the folder, ``texture_fallback``
decides: ``"procedural"`` (default) uses built-in procedural textures, ``"error"`` refuses to
train. The run's provenance and leaderboard row say which was used.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.base import AnomalyModel, AnomalyOutput, AuxStream, FitContext, OptimizerSpec, Step, TrainBatch
from adlib.models.components.blocks import UNet, conv_block, up_block
from adlib.models.components.focal_loss import focal_loss
from adlib.models.components.maps import max_score
from adlib.models.components.schedules import epoch_milestones
from adlib.models.components.sspcab import SSPCAB, sspcab_loss
from adlib.models.components.ssim import ssim_loss
from adlib.models.components.synthesis import AnomalySynthesizer
from adlib.models.registry import ModelSpec, TrainDefaults, register

TEXTURE_FALLBACKS = ("procedural", "error")


class ReconstructiveNetwork(nn.Module):
    """Encoder (4 poolings, widths w, 2w, 4w, 8w, 8w) and decoder back to the input size, no skips.

    With ``sspcab`` the bottleneck block is an SSPCAB; :meth:`forward` then also returns its input
    and output for the self-supervised loss.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128,
                 sspcab: bool = False) -> None:
        super().__init__()
        w = base_width
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.down = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip((in_channels,) + widths[:-1], widths))
        self.bottleneck = SSPCAB(8 * w) if sspcab else conv_block(8 * w, 8 * w)
        self.use_sspcab = sspcab
        ups, blocks = [], []
        for c_in, c_out in ((8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w), (w, w)):
            ups.append(up_block(c_in, c_in))
            blocks.append(conv_block(c_in, c_out, c_mid=c_in))
        self.ups, self.up_blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        for block in self.down:
            x = F.max_pool2d(block(x), 2)
        b_in = x
        x = self.bottleneck(x)
        pair = (b_in, x) if self.use_sspcab else None
        for up, block in zip(self.ups, self.up_blocks):
            x = block(up(x))
        return self.head(x), pair


class DiscriminativeNetwork(UNet):
    """U-Net: 6 encoder stages (widths c, 2c, 4c, 8c, 8c, 8c; 5 poolings), decoder with skip connections."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64) -> None:
        c = base_width
        super().__init__(in_channels, out_channels, (c, 2 * c, 4 * c, 8 * c, 8 * c, 8 * c), (8 * c, 4 * c, 2 * c, c, c))


class Draem(AnomalyModel):
    #: input sides must be multiples of this (five 2x poolings in the discriminative U-Net)
    size_multiple = 32

    def __init__(self, base_width: int = 128, disc_base_width: int = 64, sspcab: bool = True,
                 sspcab_lambda: float = 0.1, anomaly_probability: float = 0.5, beta_max: float = 0.8,
                 focal_gamma: float = 2.0, score_pool_size: int = 21, lr: float = 1e-4,
                 lr_milestones: Sequence[float] = (0.8, 0.9), lr_gamma: float = 0.2,
                 texture_fallback: str = "procedural", normalize: bool = True) -> None:
        if texture_fallback not in TEXTURE_FALLBACKS:
            raise ValueError(f"texture_fallback must be one of {TEXTURE_FALLBACKS}; got {texture_fallback!r}")
        super().__init__(normalize=normalize)
        self.reconstructive = ReconstructiveNetwork(3, 3, int(base_width), sspcab=bool(sspcab))
        self.discriminative = DiscriminativeNetwork(6, 2, int(disc_base_width))
        self.sspcab_lambda = float(sspcab_lambda)
        self.anomaly_probability, self.beta_max = float(anomaly_probability), float(beta_max)
        self.focal_gamma = float(focal_gamma)
        self.score_pool_size = int(score_pool_size)
        self.lr, self.lr_milestones, self.lr_gamma = float(lr), tuple(lr_milestones), float(lr_gamma)
        self.texture_fallback = texture_fallback
        self.synthesizer: AnomalySynthesizer | None = None

    # ----- training ------------------------------------------------------------------------------
    def auxiliary_streams(self) -> tuple[AuxStream, ...]:
        fallback = "procedural" if self.texture_fallback == "procedural" else None
        return (AuxStream("textures", source="textures", fallback=fallback),)

    def setup_fit(self, context: FitContext) -> None:
        super().setup_fit(context)
        self.synthesizer = AnomalySynthesizer(seed=context.seed, p_anomalous=self.anomaly_probability,
                                              beta_max=self.beta_max)

    def configure_optimizers(self) -> list[OptimizerSpec]:
        params = list(self.reconstructive.parameters()) + list(self.discriminative.parameters())
        optimizer = torch.optim.Adam(params, lr=self.lr)
        epochs = self.fit_context.num_epochs if self.fit_context is not None else 1
        scheduler = epoch_milestones(optimizer, epochs, self.lr_milestones, self.lr_gamma)
        return [OptimizerSpec(optimizer, scheduler, interval="epoch")]

    def _data_range(self) -> float:
        """Value range of [0, 1] images in the network's input space (for SSIM's constants)."""
        return float(1.0 / self._input_std.mean()) if self.normalize else 1.0

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        if self.synthesizer is None:
            raise RuntimeError("call setup_fit(FitContext(...)) before training DRAEM: it sets up anomaly synthesis "
                               "(its seed)")
        images = batch.images
        self.check_input_size(images)
        augmented, masks = self.synthesizer(images, batch.aux.get("textures"))
        clean, corrupted = self.normalize_input(images), self.normalize_input(augmented)
        recon, pair = self.reconstructive(corrupted)
        logits = self.discriminative(torch.cat([recon, corrupted], dim=1))
        l2 = F.mse_loss(recon.float(), clean.float())
        ssim = ssim_loss(recon, clean, data_range=self._data_range())
        focal = focal_loss(logits, masks, gamma=self.focal_gamma)
        loss = l2 + ssim + focal
        out = {"l2": l2.detach(), "ssim": ssim.detach(), "focal": focal.detach()}
        if pair is not None and self.sspcab_lambda > 0:
            sspcab = sspcab_loss(*pair)
            loss = loss + self.sspcab_lambda * sspcab
            out["sspcab"] = sspcab.detach()
        return {"loss": loss, **out}

    # ----- prediction ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        self.check_input_size(images)
        x = self.normalize_input(images)
        recon, _ = self.reconstructive(x)
        logits = self.discriminative(torch.cat([recon, x], dim=1))
        maps = torch.softmax(logits.float(), dim=1)[:, 1]
        k = self.score_pool_size
        smooth = F.avg_pool2d(maps[:, None], k, stride=1, padding=k // 2)[:, 0] if k > 1 else maps
        return AnomalyOutput(scores=max_score(smooth), maps=maps)


register(ModelSpec(
    name="draem", cls=Draem, family="reconstruction",
    paper="Zavrtanik et al., DRAEM - A Discriminatively Trained Reconstruction Embedding for Surface Anomaly "
          "Detection, ICCV 2021; Ristea et al., Self-Supervised Predictive Convolutional Attentive Block for "
          "Anomaly Detection (SSPCAB), CVPR 2022",
    train=TrainDefaults(num_epochs=700, batch_size=8, img_size=256),
    description="reconstructive + discriminative sub-networks trained on Perlin/texture simulated anomalies, "
                "SSPCAB bottleneck"))
