"""CS-Flow: one fully convolutional cross-scale normalising flow over multi-scale features.

Rudolph, Wehrbein, Rosenhahn, Wandt, "Fully Convolutional Cross-Scale-Flows for Image-based
Defect Detection", WACV 2022 (arXiv:2110.02855).

The image and ``n_scales - 1`` downscaled copies (half, quarter side) go through the same frozen
CNN up to ``layer`` (EfficientNet-B5's stage ``blocks.5``, 304 channels at stride 32, the
paper's block 36); one :class:`~adlib.models.components.cross_scale_flow.CrossScaleFlow` maps
the three feature maps jointly to standard normal latents. Loss: the per-sample negative
log-likelihood ``0.5 * sum(z^2) - log|det J|`` averaged over the batch and divided by the
number of latent dimensions (the log-Jacobian stays per sample). Adam with the paper's
``eps=1e-4`` and weight decay; gradients clipped to norm 1 (the registered ``grad_clip_norm``).

Score: the mean of ``z^2 / 2`` over all latents of an image. Map: ``mean_c z^2 / 2`` of the
finest scale's latents, upsampled to the input size (the paper's localisation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from adlib.models.base import AnomalyModel, AnomalyOutput, Step, TrainBatch
from adlib.models.components.cross_scale_flow import CrossScaleFlow
from adlib.models.components.features import image_pyramid
from adlib.models.components.flow import check_finite_likelihood, gaussian_nll
from adlib.models.components.maps import upsample_map
from adlib.models.components.module_features import ModuleFeatures
from adlib.models.registry import ModelSpec, TrainDefaults, register


class Csflow(AnomalyModel):
    frozen_modules = ("extractor",)

    def __init__(self, backbone: str = "tf_efficientnet_b5", layer: str = "blocks.5", n_scales: int = 3,
                 coupling_blocks: int = 4, hidden_channels: int = 1024, kernel_sizes: Sequence[int] = (3, 3, 3, 5),
                 clamp: float = 3.0, lr: float = 2e-4, eps: float = 1e-4, weight_decay: float = 1e-5,
                 betas: Sequence[float] = (0.9, 0.999), *, normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        if len(kernel_sizes) != coupling_blocks:
            raise ValueError(f"kernel_sizes needs one entry per coupling block ({coupling_blocks}); got "
                             f"{list(kernel_sizes)}, e.g. {[3] * (coupling_blocks - 1) + [5]}")
        self.extractor = ModuleFeatures(backbone, layer, pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.n_scales = int(n_scales)
        # every scale's feature grid must be exactly twice the next one's
        self.size_multiple = self.extractor.reduction * 2 ** (self.n_scales - 1)
        self.flow = CrossScaleFlow(self.extractor.channels, self.n_scales, int(coupling_blocks), int(hidden_channels),
                                   [int(k) for k in kernel_sizes], clamp)
        self.lr, self.eps, self.weight_decay, self.betas = float(lr), float(eps), float(weight_decay), tuple(betas)

    def latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents per scale (finest first) and the per-sample log-Jacobian ``[B]``."""
        self.check_input_size(images)
        feats = [self.extractor(self.normalize_input(x)).float() for x in image_pyramid(images, self.n_scales)]
        return self.flow(feats)

    def nll(self, zs: list[torch.Tensor], log_jac: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood per latent dimension ``[B]`` (checked to be finite)."""
        values = gaussian_nll(zs, log_jac) / sum(z[0].numel() for z in zs)
        check_finite_likelihood(-values, "CS-Flow", self.lr, keep="grad_clip_norm=1 and amp=False")
        return values

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.flow.parameters(), lr=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                                 betas=self.betas)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        return self.nll(*self.latents(batch.images)).mean()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        zs, log_jac = self.latents(images)
        self.nll(zs, log_jac)
        scores = torch.cat([z.square().flatten(1) for z in zs], dim=1).mean(dim=1) / 2
        maps = upsample_map(zs[0].square().mean(dim=1) / 2, images.shape[-2:])
        return AnomalyOutput(scores=scores, maps=maps)


register(ModelSpec(
    name="csflow", cls=Csflow, family="flow",
    paper="Rudolph et al., Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection, WACV 2022",
    train=TrainDefaults(num_epochs=240, batch_size=16, img_size=768, grad_clip_norm=1.0, amp=False),
    description="EfficientNet-B5 stage 5 features of the image at 3 scales, one cross-scale flow of 4 couplings"))
