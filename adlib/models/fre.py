"""FRE: feature reconstruction error of a tied linear autoencoder on frozen CNN features.

Ndiour, Ahuja, Genc, Tickoo, "FRE: A Fast Method For Anomaly Detection And Segmentation",
BMVC 2023 (arXiv:2211.12650).

One layer of a frozen CNN (ResNet-50 layer3) is average-pooled (``pooling_kernel_size``) and
flattened per image into a vector of ``D = C * h * w`` values. A tied linear autoencoder
(encoder ``W``, decoder ``W^T``, one bias each, ``W`` Xavier-initialised) is trained by
gradient descent on the mean squared reconstruction error: a learned principal subspace of
the normal features. At test time the squared error is reshaped to ``(C, h, w)`` and summed
over channels: the anomaly map (bilinearly upsampled to the input size); the image score is
the sum of the low-resolution map.

``D`` depends on the backbone, the layer, the image size and the pooling, so it is derived
when training starts (:func:`pooled_feature_shape`, one probe forward at the training image
size) and saved with the weights; nothing is hard-coded.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, FitContext, Step, TrainBatch
from adlib.models.components.maps import upsample_map
from adlib.models.registry import ModelSpec, TrainDefaults, register


class TiedLinearAutoencoder(nn.Module):
    """``x -> W^T (W x + b_enc) + b_dec`` with one weight matrix ``W`` of shape ``[latent, D]``."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(int(latent_dim), int(input_dim)))
        self.encoder_bias = nn.Parameter(torch.zeros(int(latent_dim)))
        self.decoder_bias = nn.Parameter(torch.zeros(int(input_dim)))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight, self.encoder_bias), self.weight.t(), self.decoder_bias)


def pooled_feature_shape(extractor: FeatureExtractor, img_size: int, pooling_kernel_size: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of ``extractor``'s (single) layer at ``img_size`` after average pooling,
    from one probe forward; a clear error when the pooling does not fit the feature map."""
    device = next(extractor.parameters()).device
    with torch.no_grad():
        feat = extractor(torch.zeros(1, 3, int(img_size), int(img_size), device=device))[0]
    c, h, w = feat.shape[1:]
    k = int(pooling_kernel_size)
    if k < 1 or k > min(h, w):
        smallest = k * extractor.reductions[0]
        raise ValueError(f"FRE's pooling_kernel_size={k} does not fit the {h}x{w} feature map of {extractor.name} "
                         f"{extractor.layers[0]} at {img_size} px: use pooling_kernel_size between 1 and {min(h, w)}, "
                         f"or img_size >= {smallest}")
    return c, h // k, w // k


class Fre(AnomalyModel):
    frozen_modules = ("extractor",)

    def __init__(self, backbone: str = "resnet50", layer: str = "layer3", pooling_kernel_size: int = 2,
                 latent_dim: int = 220, lr: float = 1e-3, *, normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        if int(latent_dim) < 1 or int(pooling_kernel_size) < 1:
            raise ValueError(f"FRE needs latent_dim >= 1 and pooling_kernel_size >= 1; got {latent_dim}, "
                             f"{pooling_kernel_size}")
        self.extractor = FeatureExtractor(backbone, [layer], pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.extractor.mean, self.extractor.std)
        self.pooling_kernel_size, self.latent_dim, self.lr = int(pooling_kernel_size), int(latent_dim), float(lr)
        #: (C, h, w) of the pooled features the autoencoder was built for (0s until training starts)
        self.register_buffer("feature_shape", torch.zeros(3, dtype=torch.long))
        self.autoencoder: TiedLinearAutoencoder | None = None

    def _build_autoencoder(self, shape: tuple[int, int, int]) -> None:
        input_dim = math.prod(shape)
        if self.latent_dim >= input_dim:
            raise ValueError(f"FRE's latent_dim={self.latent_dim} must be smaller than the input dimension "
                             f"{input_dim} (= {' x '.join(map(str, shape))}, the pooled {self.extractor.layers[0]} "
                             f"features): lower latent_dim, raise img_size or lower pooling_kernel_size")
        self.feature_shape = torch.tensor(shape, dtype=torch.long, device=self.feature_shape.device)
        self.autoencoder = TiedLinearAutoencoder(input_dim, self.latent_dim).to(self.feature_shape.device)

    def setup_fit(self, context: FitContext) -> None:
        super().setup_fit(context)
        self._build_autoencoder(pooled_feature_shape(self.extractor, context.img_size, self.pooling_kernel_size))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, flattened layer features ``[B, D]``."""
        feat = self.extractor(self.normalize_input(images))[0].float()
        if self.pooling_kernel_size > 1:
            feat = F.avg_pool2d(feat, self.pooling_kernel_size)
        expected = tuple(int(v) for v in self.feature_shape)
        if tuple(feat.shape[1:]) != expected:
            raise ValueError(f"FRE was trained on images whose pooled features are {expected}; "
                             f"{images.shape[-2]}x{images.shape[-1]} images give {tuple(feat.shape[1:])}: "
                             "predict at the training image size")
        return feat.flatten(1)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        feats = self.features(batch.images)
        return F.mse_loss(self.autoencoder(feats), feats)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        if self.autoencoder is None:
            raise RuntimeError("FRE is not trained: fit it (or load saved weights) before predict()")
        feats = self.features(images)
        error = (feats - self.autoencoder(feats)).square().view(len(images), *self.feature_shape.tolist())
        low_res = error.sum(dim=1)
        return AnomalyOutput(scores=low_res.flatten(1).sum(dim=1), maps=upsample_map(low_res, images.shape[-2:]))

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """The autoencoder's size was derived at training time: rebuild it from the saved shape."""
        if "feature_shape" in state:
            self._build_autoencoder(tuple(int(v) for v in state["feature_shape"]))
        super().load_saved_state(state)


register(ModelSpec(
    name="fre", cls=Fre, family="feature_adaptation",
    paper="Ndiour et al., FRE: A Fast Method For Anomaly Detection And Segmentation, BMVC 2023, arXiv:2211.12650",
    train=TrainDefaults(num_epochs=220, batch_size=32, img_size=256),
    description="Tied linear autoencoder on average-pooled ResNet-50 layer3 features; reconstruction-error maps"))
