"""The contract every anomaly model follows (docs/adding-a-model.md walks through it).

A model is a plain ``nn.Module``. It never runs a training loop, logs or opens files: the one
loop in :mod:`adlib.training` drives it, the data layer decodes every image it sees (training
images and auxiliary streams alike), and :mod:`adlib.artifacts` saves it.

What a model declares (class attributes unless noted):

* ``learns_by``: ``"one_pass"`` (memory models: :meth:`collect` over the training images once,
  then :meth:`finalize`) or ``"gradient"`` (:meth:`configure_optimizers`, then
  :meth:`training_step` per batch).
* ``phases``: named parts of a gradient schedule with their fractions, e.g. DSR's
  ``(("decoder", 0.7), ("upsampling", 0.3))``; :attr:`Step.phase` says which is active and an
  :class:`OptimizerSpec` with ``phase=`` steps only then.
* ``manual_optimization``: the model steps its optimisers itself, through the
  :class:`~adlib.training.Stepper` it is handed (many optimiser steps per batch, as CFlow's
  fiber batches); the Stepper still owns AMP scaling, clipping, NaN checks and schedules.
* ``data_passes``: :class:`DataPass` es over the training or the held-out validation split,
  before or after the gradient phases (teacher statistics, memory initialisation, map
  quantiles). The loop calls :meth:`collect` per batch (eval mode, no gradients), then
  :meth:`end_pass`.
* :meth:`auxiliary_streams` (a method: it may depend on the configuration): extra image sets
  the loop streams into :attr:`TrainBatch.aux`, one batch per step.
* ``produces_maps``: False for image-level models (``predict`` then returns ``maps=None``).
* ``frozen_modules``: sub-modules with pretrained weights that are reloaded, not saved.
* ``decision_method``: the name of the model's own unsupervised decision rule (U-Flow's
  ``"nfa"``), reported in threshold tables beside the fitted thresholds; ``predict`` then fills
  :attr:`AnomalyOutput.decision`.

Micro-batches: with the training key ``micro_batch_size`` (CPU runs) the loop cuts each batch
into parts (:meth:`TrainBatch.split`), calls :meth:`training_step` once per part and weights
each part's losses by its share of the batch before one optimiser step. That is the whole
batch's gradient only for losses that are means over images (batch-norm layers in training
mode see each part's statistics), so a model sets it in its defaults only where that holds.

Prediction: :meth:`predict` takes images in [0, 1] (``B x 3 x H x W``) and returns one score
per image and, unless image-level, an anomaly map at input resolution. Input normalisation is
the model's own business (``normalize``), so a saved model works on raw images.

Persistence: all learned state lives in parameters and buffers (memory banks, normalisation
statistics) so ``state_dict`` captures it. Buffers whose size is only known after training are
resized on load.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from adlib.training import Stepper

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the phase of a model that declares none
DEFAULT_PHASE = "train"


@dataclasses.dataclass
class AnomalyOutput:
    """Per-image anomaly scores ``[B]`` and optional anomaly maps ``[B, H, W]`` (input size).

    ``decision`` ``[B]`` (models with a ``decision_method`` only): the statistic of the model's
    own decision rule, which needs no fitted threshold: an image is anomalous when it is >= 0.
    """

    scores: torch.Tensor
    maps: torch.Tensor | None = None
    decision: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """One batch of training images with everything the data layer knows about them.

    ``labels`` are 0 for normal images (all of them, unless the configuration trains on
    labelled anomalous images); ``masks`` are zeros where an image has no defect mask;
    ``aux`` holds one batch of each declared auxiliary stream.
    """

    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    labels: torch.Tensor  # [B] int64
    masks: torch.Tensor  # [B, 1, H, W] in {0, 1}
    aux: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, images: torch.Tensor, labels: torch.Tensor | None = None, masks: torch.Tensor | None = None,
           aux: Mapping[str, torch.Tensor] | None = None) -> "TrainBatch":
        """A batch of normal images (zero labels and masks unless given)."""
        b, _, h, w = images.shape
        labels = torch.zeros(b, dtype=torch.long, device=images.device) if labels is None else labels
        masks = torch.zeros(b, 1, h, w, dtype=images.dtype, device=images.device) if masks is None else masks
        return cls(images, labels, masks, dict(aux or {}))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def split(self, size: int) -> list["TrainBatch"]:
        """Consecutive parts of at most ``size`` images (micro-batches); each auxiliary batch is
        cut into as many parts, in order."""
        images = self.images.split(size)
        count = len(images)
        short = [name for name, batch in self.aux.items() if len(batch) < count]
        if short:
            raise ValueError(f"cannot cut this batch into {count} micro-batches of {size}: auxiliary stream(s) "
                             f"{', '.join(short)} hold fewer images than that; raise micro_batch_size")
        aux = {name: batch.tensor_split(count) for name, batch in self.aux.items()}
        return [TrainBatch(part, labels, masks, {name: chunks[i] for name, chunks in aux.items()})
                for i, (part, labels, masks) in enumerate(zip(images, self.labels.split(size), self.masks.split(size)))]


@dataclasses.dataclass(frozen=True)
class Step:
    """Where a training step stands in its fit."""

    index: int  # global optimiser step (data batch), 0-based
    epoch: int  # 0-based
    total: int  # steps this fit runs
    phase: str = DEFAULT_PHASE

    @property
    def progress(self) -> float:
        """Fraction of the schedule done before this step, in [0, 1)."""
        return self.index / max(self.total, 1)


@dataclasses.dataclass
class OptimizerSpec:
    """An optimiser, its optional scheduler, and what it minimises when.

    ``interval``: the scheduler steps after every optimiser step (``"step"``) or every epoch.
    ``loss``: key of :meth:`AnomalyModel.training_step`'s dict this optimiser minimises.
    ``phase``: active only in that phase (None: always).
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # torch.optim.lr_scheduler.LRScheduler
    interval: Literal["epoch", "step"] = "epoch"
    loss: str = "loss"
    phase: str | None = None

    def __post_init__(self) -> None:
        if self.interval not in ("epoch", "step"):
            raise ValueError(f"OptimizerSpec.interval must be 'epoch' or 'step'; got {self.interval!r}")

    def active_in(self, phase: str) -> bool:
        return self.phase is None or self.phase == phase


@dataclasses.dataclass(frozen=True)
class DataPass:
    """A pass over a split without gradients, before or after the gradient phases."""

    name: str
    when: Literal["before", "after"]
    split: Literal["train", "validation"] = "train"

    def __post_init__(self) -> None:
        if self.when not in ("before", "after") or self.split not in ("train", "validation"):
            raise ValueError(f"DataPass {self.name!r}: when must be 'before'/'after' and split 'train'/'validation'")


@dataclasses.dataclass(frozen=True)
class AuxStream:
    """An auxiliary image set streamed into :attr:`TrainBatch.aux` (one batch per step).

    ``source`` names the auxiliary folder (see :data:`adlib.data.auxiliary.SOURCES`:
    ``"textures"`` = DTD-like, ``"imagenet"`` = Imagenette-like). ``batch_size`` and ``size``
    default to the training batch size and image size. ``fallback`` names what the model does
    without the folder (documented in its module); None means the folder is required.
    """

    name: str
    source: str
    batch_size: int | None = None
    size: int | None = None
    fallback: str | None = None


@dataclasses.dataclass(frozen=True)
class FitContext:
    """What a model may know about its training run before it starts.

    ``num_epochs`` and ``total_steps`` are what this fit will run (the budget after
    ``max_steps``); ``aux_sources`` says where each declared auxiliary stream comes from
    (``"folder:<path>"``) or which fallback replaces it (``"fallback:<name>"``).
    """

    device: torch.device
    seed: int = 0
    img_size: int = 256
    num_epochs: int = 1
    steps_per_epoch: int = 1
    total_steps: int = 1
    num_train_images: int = 0
    aux_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)


class AnomalyModel(nn.Module):
    """Base class of every registered model. Subclasses take their resolved config as kwargs;
    every argument has a default (the registry reads a configuration's defaults from there)."""

    learns_by: ClassVar[Literal["one_pass", "gradient"]] = "gradient"
    manual_optimization: ClassVar[bool] = False
    phases: ClassVar[tuple[tuple[str, float], ...]] = ((DEFAULT_PHASE, 1.0),)
    data_passes: ClassVar[tuple[DataPass, ...]] = ()
    produces_maps: ClassVar[bool] = True
    #: names of sub-modules holding frozen pretrained weights (not saved, reloaded instead)
    frozen_modules: ClassVar[tuple[str, ...]] = ()
    #: input sides must be multiples of this (a class or instance attribute)
    size_multiple: int = 1
    #: name of the model's own unsupervised decision rule in threshold tables (None: it has none)
    decision_method: ClassVar[str | None] = None

    def __init__(self, normalize: bool = True, mean: Iterable[float] = IMAGENET_MEAN,
                 std: Iterable[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        self.register_buffer("_input_mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_input_std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)
        self.fit_context: FitContext | None = None
        #: the registry configuration this module was built from (set by the registry)
        self.config = None

    # ----- input -----------------------------------------------------------------------
    def set_input_stats(self, mean: Iterable[float], std: Iterable[float]) -> None:
        """Use a backbone's own normalisation statistics (e.g. 0.5/0.5 for EfficientNet-Lite)."""
        self._input_mean.copy_(torch.tensor(list(mean)).view(1, 3, 1, 1))
        self._input_std.copy_(torch.tensor(list(std)).view(1, 3, 1, 1))

    def check_input_size(self, images: torch.Tensor | tuple[int, int]) -> None:
        """Refuse image sides that are not multiples of :attr:`size_multiple`, naming a valid size."""
        h, w = images.shape[-2:] if isinstance(images, torch.Tensor) else images
        m = int(self.size_multiple)
        if h % m or w % m:
            raise ValueError(f"{type(self).__name__} needs image sides that are multiples of {m}; got {h}x{w}. "
                             f"Choose img_size accordingly (e.g. {max(m, round(max(h, w) / m) * m)}).")

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to the model's input space (identity when ``normalize`` is off)."""
        if not self.normalize:
            return images
        return (images - self._input_mean) / self._input_std

    # ----- what training needs ----------------------------------------------------------
    def required_weights(self) -> tuple[str, ...]:
        """Catalog names of the pretrained weight files this configuration loads (default: its
        ``backbone`` option, if any); checked before any job runs."""
        backbone = (self.config.model if self.config is not None else {}).get("backbone")
        return (backbone,) if backbone else ()

    # ----- training hooks ----------------------------------------------------------------
    def auxiliary_streams(self) -> tuple[AuxStream, ...]:
        """Auxiliary image streams this configuration trains with (default: none)."""
        return ()

    def setup_fit(self, context: FitContext) -> None:
        """Called once before training (and before :meth:`configure_optimizers`)."""
        self.fit_context = context

    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        """One batch of a data pass (``"fit"`` for one-pass models, else a declared pass name)."""
        raise NotImplementedError(f"{type(self).__name__} declares no data pass {pass_name!r}")

    def end_pass(self, pass_name: str) -> None:
        """Called after the last batch of a declared data pass."""

    def configure_optimizers(self) -> list[OptimizerSpec | torch.optim.Optimizer]:
        """Gradient models: the optimisers, stepped in this order (a bare optimiser is an
        :class:`OptimizerSpec` on the ``"loss"`` key, always active, without scheduler)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn by gradient steps")

    def training_step(self, batch: TrainBatch, step: Step, stepper: "Stepper | None" = None
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Gradient models: the loss of a batch, or a dict of losses (each optimiser minimises
        its spec's key; other keys are logged). With ``manual_optimization`` the model steps
        through ``stepper`` and returns detached values for logging."""
        raise NotImplementedError(f"{type(self).__name__} does not learn by gradient steps")

    def validation_loss(self, batch: TrainBatch) -> torch.Tensor:
        """Loss on held-out normal images for early stopping (default: the training loss,
        computed without gradients in eval mode)."""
        if self.manual_optimization:
            raise NotImplementedError(f"{type(self).__name__} steps itself: it defines no validation loss")
        out = self.training_step(batch, Step(0, 0, 1, self.phases[-1][0]))
        return out["loss"] if isinstance(out, dict) else out

    def on_epoch_end(self, epoch: int) -> None:
        """Called after every training epoch."""

    def finalize(self) -> None:
        """Called once after training and the data passes (one-pass: build the memory)."""

    def provenance(self) -> dict[str, Any]:
        """Facts about how this model was trained that results must show (e.g. a fallback)."""
        return {}

    # ----- prediction --------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        raise NotImplementedError

    # ----- persistence -------------------------------------------------------------------
    def saved_state(self) -> dict[str, torch.Tensor]:
        """State to save: everything except frozen pretrained modules."""
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith(prefixes)}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`saved_state` output, resizing buffers whose size was data-dependent."""
        own = dict(self.named_buffers())
        resized = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
        for key in resized:  # the loaded tensor becomes the buffer (no second copy)
            module_name, _, buffer_name = key.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            module.register_buffer(buffer_name, state[key].to(own[key].device))  # its own dtype, as saved
        missing, unexpected = self.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        missing = [k for k in missing if not k.startswith(prefixes) and k not in resized]
        if missing or unexpected:
            raise ValueError(f"saved weights do not match {type(self).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_phases(phases: tuple[tuple[str, float], ...], where: str) -> None:
    """Phase names are unique and their fractions positive and summing to 1."""
    names = [name for name, _ in phases]
    fractions = [float(f) for _, f in phases]
    if not phases or len(set(names)) != len(names) or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"{where}: phases must be unique names with positive fractions summing to 1; got {phases}")
