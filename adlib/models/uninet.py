"""UniNet: contrastive reverse distillation from two teachers with domain-related feature selection.

Wei, Jiang, Xu, "UniNet: A Contrastive Learning-guided Unified Framework with Feature Selection
for Anomaly Detection", CVPR 2025.

* Two teachers of the same architecture (Wide-ResNet-50-2 layer1..layer3, same pretrained
  weights): the **source** teacher stays frozen, the **target** teacher is fine-tuned with a
  tiny learning rate (1e-6, its own parameter group; its batch norms adapt to the domain).
* Both teachers' pyramids, stacked along the batch, go through an **attention bottleneck**
  (reverse distillation's one-class bottleneck whose residual blocks split their channels into
  two branches, :class:`SplitKernelBottleneck`) to the **student** decoder (the
  reverse distillation decoder). The student half that came from the target teacher is matched
  to the source teacher and vice versa: six (teacher, student) pairs.
* **Domain-related feature selection** (training only) re-weights every student map by a
  spatial softmax of its teacher's map times ``theta + mean(teacher)``, with a learnable
  ``theta`` per channel and level (``clamp(sigmoid(theta) + 0.5, max=1)``).
* Loss per pair: ``0.7 * (1 - cos)`` + ``0.3 * `` a contrastive term (each student position
  must pick its own teacher position among all positions of the image, temperature ``T``)
  + margin terms (normal positions: probability >= ``margin``; anomalous positions, from the
  training masks/labels: <= ``margin / 2``).
* Inference: the six ``1 - cos`` maps upsampled and summed give the anomaly map; the score is
  the paper's weighted decision mechanism: the mean of the top ``k`` values of the
  Gaussian-smoothed map, ``k`` set per image by the maps' maxima (``alpha``, ``beta``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, OptimizerSpec, Step, TrainBatch
from adlib.models.components.maps import gaussian_blur2d, upsample_map
from adlib.models.components.reverse_distillation import (OneClassBottleneck, ReverseDecoder, check_pyramid,
                                                          conv_bn, cosine_distance_map)
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant


class SplitKernelBottleneck(nn.Module):
    """UniNet's attention bottleneck block: the input's channel halves go through a 3x3 and a
    ``large_kernel`` branch (conv-BN-ReLU-conv-BN each, the first conv with the stride), the
    concatenated branches through a 1x1 projection; residual shortcut as in ResNet.

    The reference code declares a 7x7 second branch but replaces it with a 3x3 one when the
    bottleneck is built (its ``merge_kernel`` runs at initialisation), so the trained network
    has two 3x3 branches: ``large_kernel=3`` is that network, ``7`` the declared one (2.5x the
    parameters)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1,
                 large_kernel: int = 3) -> None:
        super().__init__()
        if in_channels % 2 or width % 2:
            raise ValueError(f"SplitKernelBottleneck splits its channels in two: in_channels={in_channels} and "
                             f"width={width} must be even")
        half_in, half = in_channels // 2, width // 2
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn(half_in, half, k, stride), nn.ReLU(inplace=True), conv_bn(half, half, k))
            for k in (3, int(large_kernel)))
        self.project = conv_bn(width, out_channels, 1)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else conv_bn(in_channels, out_channels, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = x.chunk(2, dim=1)
        out = self.project(torch.cat([branch(h) for branch, h in zip(self.branches, halves)], dim=1))
        return F.relu(out + self.shortcut(x))


class DomainFeatureSelection(nn.Module):
    """Re-weights student maps by their teacher's spatial softmax (per channel) times
    ``theta + mean(teacher)``; ``theta = clamp(sigmoid(t) + 0.5, max=1)`` with a learnable ``t``
    per channel of every teacher level (shared by the source and target pairs of a level)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(1, int(c), 1, 1)) for c in channels)

    def forward(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, (s, t) in enumerate(zip(students, teachers)):
            theta = torch.clamp(torch.sigmoid(self.logits[i % len(self.logits)]) + 0.5, max=1.0)
            spatial = torch.softmax(t.flatten(2), dim=-1).view_as(t)
            out.append(s * spatial * (theta + t.mean(dim=(-2, -1), keepdim=True)))
        return out


def anomalous_positions(masks: torch.Tensor, labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[B, h*w]`` booleans: defect-mask positions (nearest-downsampled), or the whole image for
    an image labelled anomalous without a mask. All False for normal training images."""
    mask = F.interpolate(masks.float(), size=tuple(size), mode="nearest").flatten(1) > 0.5
    unmasked = (labels > 0) & ~mask.any(dim=1)
    return mask | unmasked[:, None]


#: largest similarity block (elements) built at once by :func:`own_position_log_prob`: 64 MiB in float32
SIMILARITY_BLOCK = 2**24


def _row_logsumexp(rows: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.logsumexp(rows @ keys.transpose(1, 2) / temperature, dim=-1)


def own_position_log_prob(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          block: int = SIMILARITY_BLOCK) -> torch.Tensor:
    """``log softmax_q(s_p . t_q / T)`` at ``q = p`` for unit vectors ``[B, P, C]``: ``[B, P]``.

    The ``P x P`` similarities are built a block of rows at a time and recomputed in the
    backward pass (activation checkpointing), so memory stays at ``block`` elements instead of
    ``B * P * P`` (4096 positions at stride 4 of a 256 px image: 64 MiB per image and pair).
    """
    own = (student * teacher).sum(dim=-1) / temperature
    batch, positions = student.shape[:2]
    rows = max(1, block // max(1, batch * positions))
    if rows >= positions:
        return own - _row_logsumexp(student, teacher, temperature)
    parts = [checkpoint(_row_logsumexp, student[:, i:i + rows], teacher, temperature, use_reentrant=False)
             for i in range(0, positions, rows)]
    return own - torch.cat(parts, dim=1)


def contrastive_pair_loss(teacher: torch.Tensor, student: torch.Tensor, anomalous: torch.Tensor, *,
                          temperature: float, margin: float, cosine_weight: float) -> torch.Tensor:
    """One (teacher, student) pair's loss: ``w * mean(1 - cos) + (1 - w) * contrastive + margins``.

    Contrastive: for each position ``p`` of an image, ``prob_p`` = softmax over the image's
    teacher positions ``q`` of ``cos(s_p, t_q) / temperature``, taken at ``q = p``; the term is
    ``-mean log prob_p`` over normal positions. Margins: ``mean relu(margin - prob_p)`` over normal
    positions, ``mean relu(prob_p - margin / 2)`` over anomalous ones.
    """
    s = F.normalize(student.float().flatten(2).transpose(1, 2), dim=-1)  # [B, P, C]
    t = F.normalize(teacher.float().flatten(2).transpose(1, 2), dim=-1)
    cosine = 1.0 - (s * t).sum(dim=-1)  # [B, P]
    log_prob = own_position_log_prob(s, t, temperature)
    prob = log_prob.exp()
    normal = ~anomalous
    loss = cosine_weight * cosine.mean()
    if normal.any():
        loss = loss + (1.0 - cosine_weight) * -log_prob[normal].mean() + F.relu(margin - prob[normal]).mean()
    if anomalous.any():
        loss = loss + F.relu(prob[anomalous] - margin / 2).mean()
    return loss


def weighted_decision_scores(low_res: Sequence[torch.Tensor], smoothed: torch.Tensor, alpha: float,
                             beta: float) -> torch.Tensor:
    """The paper's image score: the mean of the top ``k`` values of the smoothed map ``[B, H, W]``.

    Per image, the maxima of the pair maps ``low_res`` whose softmax (over pairs) exceeds the
    mean probability are averaged; ``k = H * W * max(alpha * that mean, beta)`` (at least 1).
    """
    maxima = torch.stack([m.flatten(1).amax(dim=1) for m in low_res])  # [pairs, B]
    probs = torch.softmax(maxima, dim=0)
    keep = probs > probs.mean(dim=0, keepdim=True)
    keep = torch.where(keep.any(dim=0, keepdim=True), keep, torch.ones_like(keep))  # all equal: use all
    mean_kept = (maxima * keep).sum(dim=0) / keep.sum(dim=0)
    pixels = smoothed[0].numel()
    k = (pixels * torch.clamp(alpha * mean_kept, min=beta)).long().clamp(1, pixels)  # [B]
    ranked = smoothed.flatten(1).sort(dim=1, descending=True).values.cumsum(dim=1)
    return ranked.gather(1, (k - 1)[:, None]).squeeze(1) / k


class UniNet(AnomalyModel):
    frozen_modules = ("source_teacher",)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 width_ratio: float = 0.5, bottleneck_blocks: int = 3, decoder_blocks: Sequence[int] = (3, 4, 6),
                 large_kernel: int = 3, temperature: float = 2.0, cosine_weight: float = 0.7, margin: float = 1.0,
                 lr: float = 5e-3, teacher_lr: float = 1e-6, weight_decay: float = 1e-5,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, amsgrad: bool = False,
                 lr_milestones: Sequence[float] = (), lr_gamma: float = 0.2, alpha: float = 0.01,
                 beta: float = 3e-5, score_sigma: float = 4.0, *, normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        if temperature <= 0:
            raise ValueError(f"UniNet's temperature must be positive; got {temperature}")
        if any(not 0 < f < 1 for f in lr_milestones):
            raise ValueError(f"lr_milestones are fractions of the training steps in (0, 1); got {list(lr_milestones)}")
        self.source_teacher = FeatureExtractor(backbone, list(layers), pretrained=pretrained,
                                               backbone_dir=backbone_dir)
        check_pyramid(layers, self.source_teacher.reductions, "UniNet")
        self.target_teacher = FeatureExtractor(backbone, list(layers), pretrained=pretrained,
                                               backbone_dir=backbone_dir, frozen=False)
        self.set_input_stats(self.source_teacher.mean, self.source_teacher.std)
        channels = self.source_teacher.channels
        self.bottleneck = OneClassBottleneck(
            channels, blocks=int(bottleneck_blocks), width_ratio=float(width_ratio),
            block=lambda i, w, o, s: SplitKernelBottleneck(i, w, o, s, large_kernel=int(large_kernel)))
        self.student = ReverseDecoder(channels, self.bottleneck.out_channels, blocks=list(decoder_blocks),
                                      width_ratio=float(width_ratio))
        self.feature_selection = DomainFeatureSelection(channels)
        self.size_multiple = 2 * self.source_teacher.reductions[-1]
        self.loss_options = {"temperature": float(temperature), "margin": float(margin),
                             "cosine_weight": float(cosine_weight)}
        self.optimizer_options = {"lr": float(lr), "teacher_lr": float(teacher_lr), "weight_decay": float(weight_decay),
                                  "betas": tuple(float(b) for b in betas), "eps": float(eps), "amsgrad": bool(amsgrad),
                                  "milestones": [float(f) for f in lr_milestones], "gamma": float(lr_gamma)}
        self.alpha, self.beta, self.score_sigma = float(alpha), float(beta), float(score_sigma)

    def pairs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The six (teacher, student) map pairs: source teacher with the student of the target
        teacher's half, then target teacher with the student of the source teacher's half."""
        x = self.normalize_input(images)
        source, target = self.source_teacher(x), self.target_teacher(x)
        student = self.student(self.bottleneck([torch.cat([t, s]) for t, s in zip(target, source)]))
        from_target, from_source = zip(*(s.chunk(2) for s in student))
        return [*source, *target], [*from_target, *from_source]

    def configure_optimizers(self) -> list[OptimizerSpec]:
        o = self.optimizer_options
        student_side = [*self.student.parameters(), *self.bottleneck.parameters(),
                        *self.feature_selection.parameters()]
        optimizer = torch.optim.AdamW([{"params": student_side, "lr": o["lr"]},
                                       {"params": list(self.target_teacher.parameters()), "lr": o["teacher_lr"]}],
                                      lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"],
                                      amsgrad=o["amsgrad"])
        total = self.fit_context.total_steps if self.fit_context else 1
        milestones = sorted({max(1, round(f * total)) for f in o["milestones"]})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=o["gamma"])
        return [OptimizerSpec(optimizer, scheduler, interval="step")]

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> torch.Tensor:
        teachers, students = self.pairs(batch.images)
        students = self.feature_selection(students, teachers)
        return sum(contrastive_pair_loss(t, s, anomalous_positions(batch.masks, batch.labels, t.shape[-2:]),
                                         **self.loss_options)
                   for t, s in zip(teachers, students))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        self.check_input_size(images)
        low_res = [cosine_distance_map(t, s) for t, s in zip(*self.pairs(images))]
        maps = sum(upsample_map(m, images.shape[-2:]) for m in low_res)
        scores = weighted_decision_scores(low_res, gaussian_blur2d(maps, self.score_sigma), self.alpha, self.beta)
        return AnomalyOutput(scores=scores, maps=maps)


_PAPER = ("Wei, Jiang, Xu, UniNet: A Contrastive Learning-guided Unified Framework with Feature Selection for "
          "Anomaly Detection, CVPR 2025")
register(ModelSpec(
    name="uninet", cls=UniNet, family="foundation", paper=_PAPER,
    train=TrainDefaults(num_epochs=100, batch_size=8, img_size=256),
    description="Frozen source + fine-tuned target WRN50 teachers, attention bottleneck, reverse-distillation "
                "student, feature selection, contrastive loss (one class)"))
register_variant(
    "uninet-multiclass", base="uninet", scope="dataset",
    model={"temperature": 0.1, "amsgrad": True, "eps": 1e-10, "lr_milestones": [0.8]},
    train={"num_epochs": None, "max_steps": 5000},
    description="UniNet's multi-class setting: one model on all categories of a data set (5000 steps, lr x0.2 at "
                "80 %), evaluated per category")
