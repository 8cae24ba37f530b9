"""Dinomaly: reconstruction of frozen DINOv2 features by a noisy bottleneck and a linear-attention decoder.

Guo et al., "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection",
CVPR 2025 (arXiv:2405.14325).

* Encoder: a frozen DINOv2-with-registers ViT (timm ``vit_{small,base,large}_patch14_reg4_dinov2``).
  The raw output tokens of 8 middle blocks (``target_layers``; class and register tokens included)
  are kept.
* Noisy bottleneck: the mean of those 8 token sequences goes through an MLP (4x hidden width)
  with dropout ``bottleneck_dropout`` on its input, hidden and output activations: the dropout is
  the noise that keeps the decoder from learning the identity.
* Decoder: ``decoder_depth`` pre-norm transformer blocks whose attention is *linear*
  (``elu + 1`` feature maps, no softmax), so it cannot focus on the one token it should copy.
* Loose reconstruction: encoder and decoder layers are averaged in ``groups`` (two groups of
  four by default); decoder block ``i`` (counted from the last) is paired with target layer ``i``.
* Loss: per group, one cosine distance between the flattened encoder and decoder maps of each
  image (global cosine), with hard mining: the gradient of the easiest ``p`` share of positions
  (smallest point-wise cosine distance) is scaled by ``hard_mining_factor``; ``p`` grows linearly
  from 0 to ``hard_mining_final`` over the first ``hard_mining_ramp_steps`` optimiser steps
  (:attr:`Step.index`, the global step).
* Optimiser: :class:`~adlib.models.components.stable_adamw.StableAdamW` over the bottleneck and
  decoder, warm-up + cosine learning rate per optimiser step; the registry clips gradients at 0.1.
* Map and score: per group ``1 - cos`` per patch, averaged over groups, resized to
  ``score_size`` px and blurred by a 5x5 Gaussian (sigma 4); the image score is the mean of the
  top ``score_top_ratio`` of that map; the map is returned resized to the input size.

Input sides must be multiples of the ViT patch size (14): the configurations resize, then cut
the central crop (224, 392 or 448 px) as the paper does; masks are cropped identically by the
data layer. Configurations of scope "dataset" (``-multiclass``) train one model on every
category of a data set, the paper's main setting.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adlib.backbones import WeightsFileError
from adlib.models.base import AnomalyModel, AnomalyOutput, OptimizerSpec, Step, TrainBatch
from adlib.models.components.maps import gaussian_blur2d, upsample_map
from adlib.models.components.schedules import warm_cosine
from adlib.models.components.stable_adamw import StableAdamW
from adlib.models.components.vit_features import VitBlockTokens
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant

#: encoder size -> (timm DINOv2-with-registers name, ViT blocks Dinomaly reads)
ENCODERS = {
    "small": ("vit_small_patch14_reg4_dinov2", tuple(range(2, 10))),
    "base": ("vit_base_patch14_reg4_dinov2", tuple(range(2, 10))),
    "large": ("vit_large_patch14_reg4_dinov2", tuple(range(4, 19, 2))),
}
#: centre crop -> resize side (the paper's 8:7 resize-then-crop convention, e.g. R448-C392)
CROPS = {224: 256, 392: 448, 448: 512}
#: embedding width of each encoder size (named in the error for a weight file of the wrong size)
_WIDTHS = {"small": 384, "base": 768, "large": 1024}


class LinearAttention(nn.Module):
    """Multi-head attention with the ``elu(x) + 1`` kernel instead of a softmax (linear in the
    number of tokens): ``out_i = phi(q_i) . sum_j phi(k_j) v_j^T / phi(q_i) . sum_j phi(k_j)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0  # [B, heads, N, d], positive
        context = torch.einsum("bhnd,bhne->bhde", k, v)
        normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))
        out = torch.einsum("bhnd,bhde->bhne", q, context) / normaliser.unsqueeze(-1)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-8) with :class:`LinearAttention` and a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def noisy_bottleneck(dim: int, hidden_ratio: float, dropout: float) -> nn.Sequential:
    """MLP with dropout on its input, hidden and output activations."""
    hidden = int(dim * hidden_ratio)
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


def init_trainable_(module: nn.Module) -> None:
    """Linear weights truncated normal (std 0.01, within +-0.03), zero biases; LayerNorms 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def hard_mined_cosine_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], p: float,
                           factor: float) -> torch.Tensor:
    """Mean over groups of the global cosine distance between ``[B, C, h, w]`` encoder (targets,
    no gradient) and decoder maps; the gradient at the ``p`` share of positions with the smallest
    point-wise distance is multiplied by ``factor`` (the loss value itself is unchanged)."""
    losses = []
    for target, output in zip(encoder, decoder):
        target = target.detach()
        with torch.no_grad():
            distance = 1.0 - F.cosine_similarity(target, output, dim=1)  # [B, h, w]
            keep = int(distance.numel() * (1.0 - p))
            weight = torch.ones_like(distance)
            if 0 < keep < distance.numel():
                threshold = distance.flatten().topk(keep).values[-1]
                weight = torch.where(distance < threshold, torch.full_like(distance, factor), weight)
        # value of output, gradient scaled by weight (broadcast over channels)
        output = output.detach() + (output - output.detach()) * weight.unsqueeze(1)
        losses.append((1.0 - F.cosine_similarity(target.flatten(1), output.flatten(1), dim=1)).mean())
    return torch.stack(losses).mean()


class Dinomaly(AnomalyModel):
    frozen_modules = ("encoder",)

    def __init__(self, backbone: str = ENCODERS["base"][0], target_layers: Sequence[int] = ENCODERS["base"][1],
                 groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7)), decoder_depth: int = 8,
                 bottleneck_ratio: float = 4.0, bottleneck_dropout: float = 0.2, mlp_ratio: float = 4.0,
                 lr: float = 2e-3, final_lr: float = 2e-4, warmup_steps: int = 100, weight_decay: float = 1e-4,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, amsgrad: bool = True,
                 hard_mining_final: float = 0.9, hard_mining_ramp_steps: int = 1000, hard_mining_factor: float = 0.1,
                 score_size: int | None = 256, score_top_ratio: float = 0.01, blur_sigma: float = 4.0,
                 blur_kernel: int = 5, backbone_kwargs: dict[str, Any] | None = None, *, normalize: bool = True,
                 pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        self.target_layers = [int(i) for i in target_layers]
        self.groups = [[int(i) for i in g] for g in groups]
        self._check_options(decoder_depth, hard_mining_final, score_top_ratio, blur_kernel)
        try:
            self.encoder = VitBlockTokens(backbone, self.target_layers, pretrained=pretrained,
                                          backbone_dir=backbone_dir, **dict(backbone_kwargs or {}))
        except WeightsFileError as err:
            if "does not fit" not in str(err):
                raise
            raise WeightsFileError(f"{err}\n{_wrong_size_hint(backbone)}") from None
        self.set_input_stats(self.encoder.mean, self.encoder.std)
        self.size_multiple = self.encoder.patch_size
        dim, heads = self.encoder.embed_dim, self.encoder.num_heads
        self.bottleneck = noisy_bottleneck(dim, bottleneck_ratio, bottleneck_dropout)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads, mlp_ratio) for _ in range(int(decoder_depth)))
        init_trainable_(self.bottleneck)
        init_trainable_(self.decoder)
        self.lr, self.final_lr, self.warmup_steps = float(lr), float(final_lr), int(warmup_steps)
        self.weight_decay, self.betas, self.eps, self.amsgrad = float(weight_decay), tuple(betas), float(eps), amsgrad
        self.hard_mining_final, self.hard_mining_ramp_steps = float(hard_mining_final), int(hard_mining_ramp_steps)
        self.hard_mining_factor = float(hard_mining_factor)
        self.score_size = None if score_size is None else int(score_size)
        self.score_top_ratio, self.blur_sigma, self.blur_kernel = float(score_top_ratio), float(blur_sigma), int(blur_kernel)

    def _check_options(self, decoder_depth: int, hard_mining_final: float, score_top_ratio: float,
                       blur_kernel: int) -> None:
        flat = [i for g in self.groups for i in g]
        if not flat or max(flat) >= min(len(self.target_layers), int(decoder_depth)) or min(flat) < 0:
            raise ValueError(f"Dinomaly groups {self.groups} must index the {len(self.target_layers)} target layers "
                             f"and the {decoder_depth} decoder blocks (valid 0..{min(len(self.target_layers), decoder_depth) - 1})")
        if not 0.0 <= hard_mining_final < 1.0:
            raise ValueError(f"hard_mining_final is the share of easy positions whose gradient is damped; it must lie "
                             f"in [0, 1), got {hard_mining_final}")
        if not 0.0 < score_top_ratio <= 1.0:
            raise ValueError(f"score_top_ratio must lie in (0, 1], got {score_top_ratio}")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd number of pixels, got {blur_kernel}")

    def check_input_size(self, images: torch.Tensor | tuple[int, int]) -> None:
        h, w = images.shape[-2:] if isinstance(images, torch.Tensor) else images
        p = self.size_multiple
        if h % p or w % p:
            lower, upper = max(p, h // p * p), (h // p + 1) * p
            raise ValueError(
                f"Dinomaly's ViT cuts images into {p}x{p} patches: the image that reaches it (center_crop, or img_size "
                f"without a crop) must have sides that are multiples of {p}; got {h}x{w}. Use center_crop={lower} or "
                f"{upper} (the paper's crops are 224, 392 and 448 after resizing to 256, 448 and 512).")

    # ----- features ----------------------------------------------------------------------------
    def reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(encoder maps, decoder maps) per group, each ``[B, C, h, w]``."""
        self.check_input_size(images)
        tokens = self.encoder(self.normalize_input(images))
        x = self.bottleneck(torch.stack(tokens).mean(dim=0))
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x)
        decoded.reverse()  # the last decoder block reconstructs the first target layer
        h, w = images.shape[-2] // self.size_multiple, images.shape[-1] // self.size_multiple
        encoder_maps = [self._group_map(tokens, g, h, w) for g in self.groups]
        decoder_maps = [self._group_map(decoded, g, h, w) for g in self.groups]
        return encoder_maps, decoder_maps

    def _group_map(self, sequences: Sequence[torch.Tensor], group: Sequence[int], h: int, w: int) -> torch.Tensor:
        """Mean of the group's token sequences, prefix tokens dropped, as a ``[B, C, h, w]`` map."""
        mean = torch.stack([sequences[i] for i in group]).mean(dim=0)[:, self.encoder.num_prefix_tokens:]
        return mean.transpose(1, 2).reshape(mean.shape[0], -1, h, w)

    # ----- training ----------------------------------------------------------------------------
    def configure_optimizers(self) -> list[OptimizerSpec]:
        params = [*self.bottleneck.parameters(), *self.decoder.parameters()]
        optimizer = StableAdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                amsgrad=self.amsgrad)
        total = self.fit_context.total_steps if self.fit_context is not None else 1
        schedule = warm_cosine(optimizer, total, self.warmup_steps, self.final_lr / self.lr)
        return [OptimizerSpec(optimizer, schedule, interval="step")]

    def hard_mining_share(self, step: Step) -> float:
        """Share of easy positions whose gradient is damped at this global step."""
        ramp = max(self.hard_mining_ramp_steps, 1)
        return min(self.hard_mining_final * step.index / ramp, self.hard_mining_final)

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        encoder_maps, decoder_maps = self.reconstruct(batch.images)
        p = self.hard_mining_share(step)
        loss = hard_mined_cosine_loss(encoder_maps, decoder_maps, p, self.hard_mining_factor)
        return {"loss": loss, "hard_mining_share": torch.tensor(p)}

    # ----- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        encoder_maps, decoder_maps = self.reconstruct(images)
        distance = torch.stack([1.0 - F.cosine_similarity(e.float(), d.float(), dim=1)
                                for e, d in zip(encoder_maps, decoder_maps)]).mean(dim=0)  # [B, h, w]
        size = images.shape[-2:] if self.score_size is None else (self.score_size, self.score_size)
        maps = upsample_map(distance, size)
        maps = gaussian_blur2d(maps, self.blur_sigma, radius=self.blur_kernel // 2)
        flat = maps.flatten(1)
        top = max(int(flat.shape[1] * self.score_top_ratio), 1)
        scores = flat.topk(top, dim=1).values.mean(dim=1)
        return AnomalyOutput(scores=scores, maps=upsample_map(maps, images.shape[-2:]))


def _wrong_size_hint(backbone: str) -> str:
    """What to do when the weight file does not fit ``backbone``."""
    sizes = "; ".join(f"{size}: {name}, width {_WIDTHS[size]}" for size, (name, _) in ENCODERS.items())
    return (f"Dinomaly's encoder here is backbone={backbone!r}. The configurations by DINOv2 size (all with 4 "
            f"register tokens) are {sizes}. Place the file of this configuration's size in the backbone directory, "
            "or choose the dinomaly-<size>-<crop> configuration of the file's size.")


def _description(size: str, crop: int) -> str:
    backbone, layers = ENCODERS[size]
    every = " (every 2nd)" if layers[1] - layers[0] == 2 else ""
    return (f"frozen DINOv2-reg {backbone} blocks {layers[0]}-{layers[-1]}{every}, noisy MLP bottleneck, "
            f"8 linear-attention decoder blocks, R{CROPS[crop]}-C{crop}")


def _register_configurations() -> None:
    """The paper's nine configurations (encoder size x crop), each also as a multi-class variant."""
    base = register(ModelSpec(
        name="dinomaly-base-392", cls=Dinomaly, family="foundation",
        paper="Guo et al., Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection, "
              "CVPR 2025 (arXiv:2405.14325)",
        train=TrainDefaults(num_epochs=None, max_steps=5000, batch_size=16, img_size=CROPS[392], center_crop=392,
                            grad_clip_norm=0.1, amp=False),
        description=_description("base", 392)))
    for size, (backbone, layers) in ENCODERS.items():
        model = {} if size == "base" else {"backbone": backbone, "target_layers": layers}
        for crop, resize in CROPS.items():
            name = f"dinomaly-{size}-{crop}"
            if name != base.name:
                register_variant(name, base=base.name, model=model, train={"img_size": resize, "center_crop": crop},
                                 description=_description(size, crop))
            register_variant(f"{name}-multiclass", base=name, scope="dataset", model={"eps": 1e-10},
                             train={"max_steps": 10000},
                             description=f"{_description(size, crop)}; ONE model over every category of a data set")


_register_configurations()
