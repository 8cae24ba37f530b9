"""EfficientAD: accurate visual anomaly detection at millisecond-level latencies.

Batzner, Heckler, Koenig, WACV 2024 (arXiv:2303.14535).

A frozen patch description network (PDN) teacher, distilled beforehand from a large ImageNet
backbone, describes every 33x33 patch of an image. A student PDN with twice the output
channels and a small autoencoder train on the normal images (batch size 1):

* hard-feature loss: the mean of the teacher-student squared differences at or above their
  0.999 quantile (the student's first half of channels against the normalised teacher);
* penalty: the mean squared output of the student's first half on an ImageNet-like image (so
  it does not imitate the teacher outside the normal images);
* autoencoder loss against the teacher, and the student's second half against the autoencoder,
  both on a colour-jittered copy of the training image.

The teacher's outputs are normalised with its channel mean and std over the training images
(a pass before training). Maps: ``mean_c (T - S1)^2`` (structural) and ``mean_c (A - S2)^2``
(logical), each scaled so that its 0.9 and 0.995 quantiles over held-out normal training
images (the validation split, a pass after training) become 0 and 0.1, averaged, padded by
the cells an unpadded PDN loses, and resized to the image; the score is the map's maximum.

Penalty images come from the auxiliary stream ``"penalty"`` (``<data_root>/imagenette2/train``,
decoded by the data layer): the method needs them, so a missing folder stops the run before
training. The teacher is a file in the backbone directory (``efficientad_teacher_small`` /
``_medium``): the anomalib release, or one made offline with ``adlib backbones distill-teacher``.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.base import AnomalyModel, AnomalyOutput, AuxStream, DataPass, FitContext, OptimizerSpec, Step, \
    TrainBatch
from adlib.models.components.color import color_jitter, random_grayscale
from adlib.models.components.maps import max_score, upsample_map
from adlib.models.components.pdn import (STEM, TEACHER_RECORD_KEY, UNPADDED_BORDER, Autoencoder,
                                         PatchDescriptionNetwork, check_size, pdn_state_dict, seeded, teacher_name)
from adlib.models.registry import ModelSpec, TrainDefaults, register, register_variant

log = logging.getLogger(__name__)

PENALTY_STREAM = "penalty"
PREDICT_DTYPES = ("auto", "float32", "bfloat16")
#: provenance "source" of a teacher built with pretrained=False
RANDOM_TEACHER = "random-init (seed 0): for tests only, scores are not meaningful"
TEACHER_SEED, STUDENT_SEED, AUTOENCODER_SEED = 0, 1, 2


class EfficientAd(AnomalyModel):
    frozen_modules = ("teacher",)
    data_passes = (DataPass("teacher_stats", "before", "train"), DataPass("map_quantiles", "after", "validation"))

    def __init__(self, model_size: str = "small", teacher_channels: int = 384, padding: bool = False,
                 pad_maps: bool = True, lr: float = 1e-4, weight_decay: float = 1e-5, lr_step_at: float = 0.95,
                 lr_gamma: float = 0.1, hard_quantile: float = 0.999, map_quantiles: Sequence[float] = (0.9, 0.995),
                 ae_dropout: float = 0.2, color_jitter: float = 0.2, penalty_grayscale: float = 0.3,
                 predict_dtype: str = "auto", normalize: bool = True, pretrained: bool = True,
                 backbone_dir: str | Path | None = None) -> None:
        check_size(model_size)
        low, high = (float(q) for q in map_quantiles)
        if not 0.0 < low < high < 1.0:
            raise ValueError(f"map_quantiles must be two increasing values in (0, 1); got {list(map_quantiles)}")
        if not 0.0 < hard_quantile < 1.0 or not 0.0 < lr_step_at <= 1.0:
            raise ValueError(f"hard_quantile must be in (0, 1) and lr_step_at in (0, 1]; got {hard_quantile}, "
                             f"{lr_step_at}")
        if predict_dtype not in PREDICT_DTYPES:
            raise ValueError(f"predict_dtype must be one of {PREDICT_DTYPES}; got {predict_dtype!r}")
        super().__init__(normalize=normalize)  # ImageNet statistics, inside the model (the data stays [0, 1])
        c = int(teacher_channels)
        self.model_size, self.teacher_channels, self.padding = model_size, c, bool(padding)
        self.teacher = load_teacher(model_size, c, self.padding, pretrained=pretrained, backbone_dir=backbone_dir)
        self.student = seeded(lambda: PatchDescriptionNetwork(model_size, 2 * c, self.padding), STUDENT_SEED)
        self.autoencoder = seeded(lambda: Autoencoder(c, dropout=ae_dropout), AUTOENCODER_SEED)
        self.map_border = UNPADDED_BORDER if pad_maps and not self.padding else 0
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.lr_step_at, self.lr_gamma = float(lr_step_at), float(lr_gamma)
        self.hard_quantile, self.quantile_levels = float(hard_quantile), (low, high)
        self.color_jitter, self.penalty_grayscale = float(color_jitter), float(penalty_grayscale)
        self.predict_dtype = predict_dtype
        self.register_buffer("teacher_mean", torch.zeros(c))
        self.register_buffer("teacher_std", torch.ones(c))
        #: rows (structural, logical), columns (value at the low, at the high quantile); identity until fitted
        self.register_buffer("map_quantiles", torch.tensor([[0.0, 0.1], [0.0, 0.1]]))
        self._rng: torch.Generator | None = None
        self._sums: torch.Tensor | None = None  # teacher pass: count, sum, sum of squares per channel
        self._maps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._predictor: tuple[tuple, FusedPredictor] | None = None

    # ----- training ------------------------------------------------------------------------------
    def auxiliary_streams(self) -> tuple[AuxStream, ...]:
        return (AuxStream(PENALTY_STREAM, source="imagenet", batch_size=1),)

    def setup_fit(self, context: FitContext) -> None:
        super().setup_fit(context)
        n, steps = context.num_train_images, context.steps_per_epoch
        if n > 1 and steps != n:
            self._refuse_batch(-(-n // steps))
        self.student.output_side(context.img_size)  # images big enough for the PDN (else a clear error)
        self._rng = torch.Generator().manual_seed(int(context.seed))
        self._sums, self._maps = None, []
        for net in (self.teacher, self.student, self.autoencoder):  # oneDNN's faster layout (~20 % per step)
            net.to(memory_format=torch.channels_last)

    def _refuse_batch(self, batch_size: int) -> None:
        raise ValueError(f"EfficientAD trains on one image per step (batch_size=1, the paper's setting: the "
                         f"hard-feature quantile and the penalty are per image); this run's batch size is "
                         f"{batch_size}. Set batch_size=1 (the default of efficientad-small/-medium).")

    def configure_optimizers(self) -> list[OptimizerSpec]:
        params = [*self.student.parameters(), *self.autoencoder.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        total = self.fit_context.total_steps if self.fit_context is not None else 1
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(self.lr_step_at * total)),
                                                    gamma=self.lr_gamma)
        return [OptimizerSpec(optimizer, scheduler, interval="step")]

    def _normalized_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return (self.teacher(x) - self.teacher_mean.view(1, -1, 1, 1)) / self.teacher_std.view(1, -1, 1, 1)

    def training_step(self, batch: TrainBatch, step: Step, stepper=None) -> dict[str, torch.Tensor]:
        if len(batch) != 1:
            self._refuse_batch(len(batch))
        penalty = batch.aux.get(PENALTY_STREAM)
        if penalty is None:
            raise ValueError(f"EfficientAD trains with ImageNet-like penalty images from the auxiliary stream "
                             f"{PENALTY_STREAM!r}, and this batch has none. Train through `adlib train` / "
                             "adlib.run.train_run (they stream <data_root>/imagenette2/train), or give fit() "
                             "FitData(aux={'penalty': ...}).")
        if self._rng is None:
            raise RuntimeError("call setup_fit(FitContext(...)) before training EfficientAD (it seeds the "
                               "augmentations)")
        images = batch.images
        if penalty.shape[-2:] != images.shape[-2:]:
            penalty = F.interpolate(penalty, size=images.shape[-2:], mode="bilinear", align_corners=False)
        c = self.teacher_channels
        x = self.normalize_input(images)
        x_aug = self.normalize_input(color_jitter(images, self._rng, self.color_jitter))
        x_penalty = self.normalize_input(random_grayscale(penalty.to(images.dtype), self._rng, self.penalty_grayscale))
        pair = torch.cat([x, x_aug]).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            teacher = self._normalized_teacher(pair)
        # one student batch (a PDN has no normalisation layers, so batching changes nothing)
        student = self.student(torch.cat([pair, x_penalty]).contiguous(memory_format=torch.channels_last))
        distance = (teacher[:1] - student[:1, :c]).square()
        hard = distance[distance >= quantile(distance.detach(), self.hard_quantile)].mean()
        penalty_loss = student[2:, :c].square().mean()
        reconstruction = self.autoencoder(pair[1:], teacher.shape[-2:])
        ae = (teacher[1:] - reconstruction).square().mean()
        stae = (reconstruction - student[1:2, c:]).square().mean()
        return {"loss": hard + penalty_loss + ae + stae, "hard": hard.detach(), "penalty": penalty_loss.detach(),
                "ae": ae.detach(), "stae": stae.detach()}

    def validation_loss(self, batch: TrainBatch) -> torch.Tensor:
        raise NotImplementedError("EfficientAD trains a fixed budget of steps and defines no validation loss: "
                                  "leave validate_every unset")

    # ----- data passes ---------------------------------------------------------------------------
    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        if pass_name == "teacher_stats":  # running sums in float64: count, sum, sum of squares per channel
            x = self.normalize_input(batch.images).contiguous(memory_format=torch.channels_last)
            out = self.teacher(x).double()
            sums = torch.stack([torch.full_like(out[0, :, 0, 0], out[:, 0].numel()), out.sum((0, 2, 3)),
                                out.square().sum((0, 2, 3))])
            self._sums = sums if self._sums is None else self._sums + sums
        elif pass_name == "map_quantiles":
            structural, logical = self.raw_maps(batch.images)
            self._maps.append((structural.flatten().float().cpu(), logical.flatten().float().cpu()))
        else:
            super().collect(batch, pass_name)

    def end_pass(self, pass_name: str) -> None:
        if pass_name == "teacher_stats":
            if self._sums is None:
                raise ValueError("EfficientAD's teacher statistics need training images; the pass saw none")
            count, total, squares = self._sums
            mean = total / count
            std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
            self.teacher_mean.copy_(mean.float())
            self.teacher_std.copy_(std.float())
            self._sums = None
        elif pass_name == "map_quantiles":
            if not self._maps:
                raise ValueError("EfficientAD's map quantiles need held-out normal training images, and the "
                                 "validation split is empty: set validation_fraction > 0 (default 0.1)")
            for row, values in enumerate(zip(*self._maps)):
                levels = np.quantile(torch.cat(values).double().numpy(), self.quantile_levels)
                self.map_quantiles[row] = torch.as_tensor(levels, dtype=self.map_quantiles.dtype)
            self._maps = []

    def required_weights(self) -> tuple[str, ...]:
        return (teacher_name(self.model_size),)

    def provenance(self) -> dict:
        info = dict(self.teacher.weights_provenance)
        dtype = str(resolve_predict_dtype(self.predict_dtype, self.teacher_mean.device)).replace("torch.", "")
        out = {"teacher": info, "predict_dtype": f"{dtype} ({self.predict_dtype})" if self.predict_dtype == "auto"
               else dtype}
        if info.get("source") == RANDOM_TEACHER:
            out["teacher_warning"] = "random-init EfficientAD teacher (pretrained=False): for tests only"
        return out

    # ----- prediction ------------------------------------------------------------------------------
    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The structural and logical maps ``[B, h, w]`` at the PDN's resolution, before scaling."""
        return self._fused_predictor(images.device)(self.normalize_input(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        structural, logical = self.raw_maps(images)
        (s_low, s_high), (l_low, l_high) = self.map_quantiles
        combined = 0.05 * ((structural - s_low) / (s_high - s_low) + (logical - l_low) / (l_high - l_low))
        if self.map_border:
            combined = F.pad(combined, (self.map_border,) * 4)
        maps = upsample_map(combined, images.shape[-2:])
        return AnomalyOutput(scores=max_score(maps), maps=maps)

    def _fused_predictor(self, device: torch.device) -> "FusedPredictor":
        """The prediction copy of the networks, rebuilt whenever a weight or statistic changed."""
        dtype = resolve_predict_dtype(self.predict_dtype, device)
        tensors = [*self.teacher.parameters(), *self.student.parameters(), *self.autoencoder.parameters(),
                   self.teacher_mean, self.teacher_std]
        key = (dtype, tuple((t.data_ptr(), t._version) for t in tensors))
        if self._predictor is None or self._predictor[0] != key:
            self._predictor = (key, FusedPredictor(self, dtype))
        return self._predictor[1]


class FusedPredictor:
    """Teacher, student and autoencoder prepared for prediction (not a sub-module: never saved).

    The weights are copied in ``dtype`` in channels-last layout (oneDNN's fastest convolutions
    on CPUs). The first convolutions of teacher and student, which see the same image, run as
    one (3 input channels vectorise poorly: 3x faster on a CPU core); the teacher's
    normalisation and the difference ``T_hat - S1`` are folded into one convolution over the two
    trunks' outputs, which accumulates the difference in float32 instead of subtracting two
    rounded outputs.
    """

    def __init__(self, model: EfficientAd, dtype: torch.dtype) -> None:
        c = model.teacher_channels
        self.dtype = dtype
        layout = {"dtype": dtype, "memory_format": torch.channels_last}
        self.teacher, self.student = (copy.deepcopy(net).eval().to(**layout) for net in (model.teacher, model.student))
        self.autoencoder = copy.deepcopy(model.autoencoder).eval().to(**layout)
        t1, s1 = model.teacher.conv1, model.student.conv1
        self.stem = _conv_like(t1, torch.cat([t1.weight, s1.weight]), torch.cat([t1.bias, s1.bias])).to(**layout)
        self.stem_split = [t1.out_channels, s1.out_channels]
        pool = model.teacher.layers[STEM - 1]
        self.stem_padding = pool.padding if model.teacher.padding else 0
        t_head, s_head = model.teacher.head, model.student.head
        std, mean = model.teacher_std, model.teacher_mean
        self.structural_head = _conv_like(s_head, torch.cat([t_head.weight / std.view(-1, 1, 1, 1),
                                                             -s_head.weight[:c]], dim=1),
                                          (t_head.bias - mean) / std - s_head.bias[:c]).to(**layout)
        self.logical_head = _conv_like(s_head, s_head.weight[c:], s_head.bias[c:]).to(**layout)

    #: images per pass on a CPU: one at a time keeps the stem's output in cache (batch 16 in one
    #: pass costs 20 % more per image on a 2-core machine); GPUs take the whole batch
    CPU_CHUNK = 1

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type == "cpu" and len(x) > self.CPU_CHUNK:
            parts = [self(chunk) for chunk in x.split(self.CPU_CHUNK)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        stem = F.avg_pool2d(F.relu(self.stem(x), inplace=True), 2, 2, padding=self.stem_padding)
        teacher, student = (part.contiguous(memory_format=torch.channels_last)
                            for part in stem.split(self.stem_split, dim=1))
        student = self.student.trunk(student, skip=STEM)
        structural = self.structural_head(torch.cat([self.teacher.trunk(teacher, skip=STEM), student], dim=1))
        logical = self.logical_head(student)
        reconstruction = self.autoencoder(x, structural.shape[-2:])
        return (structural.float().square().mean(1),
                (reconstruction.float() - logical.float()).square().mean(1))


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A convolution with ``conv``'s geometry and the given weights."""
    out = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, padding=conv.padding,
                    device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight.detach())
    out.bias.data.copy_(bias.detach())
    return out.eval().requires_grad_(False)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) by two selections: no sort, and no
    16 M-element limit (a 384 x 210 x 210 distance tensor of a 1024 px image has 17 M)."""
    flat = values.flatten().float()
    position = q * (flat.numel() - 1)
    low = int(position)
    below = flat.kthvalue(low + 1).values
    if low + 1 >= flat.numel():
        return below
    return below + (position - low) * (flat.kthvalue(low + 2).values - below)


def resolve_predict_dtype(option: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CPUs whose oneDNN computes it natively (AVX512-BF16/AMX), else float32."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cpu" and _native_cpu_bf16() else torch.float32
    return getattr(torch, option)


def _native_cpu_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ----- the teacher file --------------------------------------------------------------------------
def load_teacher(size: str, channels: int, padding: bool, *, pretrained: bool,
                 backbone_dir: str | Path | None) -> PatchDescriptionNetwork:
    """The frozen PDN teacher: its file from the backbone directory, or (``pretrained=False``,
    tests only) a seeded random initialisation. ``weights_provenance`` says which."""
    teacher = seeded(lambda: PatchDescriptionNetwork(size, channels, padding), TEACHER_SEED)
    name = teacher_name(size)
    if pretrained:
        teacher.weights_provenance = _load_teacher_file(teacher, name, backbone_dir)
    else:
        log.warning("EfficientAD teacher %s uses RANDOM weights (pretrained=False): for tests only", name)
        teacher.weights_provenance = {"backbone": name, "source": RANDOM_TEACHER, "sha256": None, "format": None}
    teacher.eval()
    return teacher.requires_grad_(False)


def _load_teacher_file(teacher: PatchDescriptionNetwork, name: str, backbone_dir) -> dict:
    from adlib.backbones.weights import (MissingWeightsError, WeightsFileError, load_checked, read_state_dict,
                                         resolve_weights)

    distil = (f"adlib backbones distill-teacher --size {teacher.size} --images <folder of natural images> "
              f"[--source tf_efficientnet_lite0]")
    try:
        source = resolve_weights(name, backbone_dir)
    except MissingWeightsError as err:
        raise MissingWeightsError(
            f"EfficientAD needs its distilled PDN-{teacher.size} teacher.\n{err}\nOr distil one offline from any "
            f"backbone you have, on any folder of natural images (the paper's recipe, docs/models.md):\n"
            f"    {distil}\nwhich writes {name}.safetensors into the backbone directory.") from None
    record = teacher_record(source.path)
    try:
        load_checked(teacher, pdn_state_dict(read_state_dict(source.path)), source.path)
    except WeightsFileError as err:
        made = f"; its distillation record says PDN-{record.get('model_size')}" if record else ""
        raise WeightsFileError(
            f"{err}\n{source.path} is not a PDN-{teacher.size} teacher with {teacher.out_channels} output channels "
            f"(a teacher of the other size, or another file under this name?{made}). Fix: replace it with the "
            f"{teacher.size} teacher (`adlib backbones where {name}` shows the fetch command), or distil one: "
            f"{distil} --force") from None
    provenance = source.provenance("state_dict")
    if record is not None:
        provenance["distilled"] = record
    return provenance


def teacher_record(path: str | Path) -> dict | None:
    """The distillation record stored in a teacher written by ``adlib backbones distill-teacher``."""
    import json

    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(TEACHER_RECORD_KEY)
    return json.loads(text) if text else None


_PAPER = ("Batzner, Heckler, Koenig, EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level "
          "Latencies, WACV 2024, arXiv:2303.14535")
register(ModelSpec(
    name="efficientad-small", cls=EfficientAd, family="distillation", paper=_PAPER,
    train=TrainDefaults(num_epochs=None, max_steps=70_000, batch_size=1, img_size=256, validation_fraction=0.1),
    aliases=("efficientad-s",),
    description="PDN-S teacher-student + autoencoder, hard-feature and ImageNet penalty losses; quantile-scaled maps"))
register_variant("efficientad-medium", base="efficientad-small", model={"model_size": "medium"},
                 aliases=("efficientad-m",),
                 description="PDN-M teacher-student + autoencoder, hard-feature and ImageNet penalty losses; "
                             "quantile-scaled maps")
