"""The contract every anomaly model follows.

A model is a plain ``nn.Module``. It never runs a training loop, logs or touches files: the
one loop in :mod:`adlib.training` drives it, and :mod:`adlib.artifacts` saves it.

Two ways of learning, declared by ``learns_by``:

* ``"one_pass"`` (memory models such as PaDiM, PatchCore, DFKDE, DFM): the loop calls
  :meth:`collect` on every training batch once, then :meth:`finalize`.
* ``"gradient"`` (everything else): the loop asks :meth:`configure_optimizers` once, then calls
  :meth:`training_step` per batch and steps the optimisers with the returned loss. Models with
  several optimisers or alternating updates (GANs, multi-stage training) set
  ``manual_optimization = True`` and step the optimisers they were given themselves inside
  :meth:`training_step`, returning the (detached) loss for logging. A gradient model that needs
  statistics of the training images after training (e.g. map normalisation quantiles) sets
  ``post_fit_pass = True``: the loop then calls :meth:`collect` once per training batch (no
  gradients, eval mode) after the last epoch. :meth:`finalize` runs last in both modes.

Prediction: :meth:`predict` takes a batch of images in [0, 1] (``B x 3 x H x W``) and returns an
:class:`AnomalyOutput` with one score per image and an anomaly map at input resolution (or
``None`` for image-level-only models, which must then say so through ``produces_maps``).

Input normalisation is the model's own business (``normalize`` in its config): use
:meth:`normalize_input`, so a saved model works on raw images without outside knowledge.

Persistence: all learned state lives in parameters and buffers (memory banks included) so
``state_dict`` captures it; frozen pretrained backbones are excluded from saved weights (they
are reloaded from the backbone directory) by listing them in ``frozen_modules``.
Buffers whose size is only known after training (memory banks) are resized on load.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class AnomalyOutput:
    """Per-image anomaly scores ``[B]`` and optional anomaly maps ``[B, H, W]`` (input size)."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class FitContext:
    """What a model may need to know about its training run before it starts.

    ``texture_dir`` / ``imagenet_dir`` are the auxiliary data sets (DTD-like textures for
    anomaly synthesis, an ImageNet-like folder for EfficientAD); ``None`` when not configured.
    """

    device: torch.device
    num_epochs: int
    steps_per_epoch: int
    num_train_images: int
    seed: int = 0
    texture_dir: Path | None = None
    imagenet_dir: Path | None = None
    img_size: int = 256


class AnomalyModel(nn.Module):
    """Base class of every registered model. Subclasses take their resolved config as kwargs."""

    learns_by: ClassVar[Literal["one_pass", "gradient"]] = "gradient"
    manual_optimization: ClassVar[bool] = False
    post_fit_pass: ClassVar[bool] = False
    produces_maps: ClassVar[bool] = True
    #: names of sub-modules holding frozen pretrained weights (not saved, reloaded instead)
    frozen_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, normalize: bool = True, mean: Iterable[float] = IMAGENET_MEAN,
                 std: Iterable[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        self.register_buffer("_input_mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_input_std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)
        self.fit_context: FitContext | None = None

    # ----- input -----------------------------------------------------------------------
    def set_input_stats(self, mean: Iterable[float], std: Iterable[float]) -> None:
        """Use a backbone's own normalisation statistics (e.g. 0.5/0.5 for EfficientNet-Lite)."""
        self._input_mean.copy_(torch.tensor(list(mean)).view(1, 3, 1, 1))
        self._input_std.copy_(torch.tensor(list(std)).view(1, 3, 1, 1))

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to the model's input space (identity when ``normalize`` is off)."""
        if not self.normalize:
            return images
        return (images - self._input_mean) / self._input_std

    # ----- training hooks ----------------------------------------------------------------
    def setup_fit(self, context: FitContext) -> None:
        """Called once before training; override to prepare (e.g. load auxiliary textures)."""
        self.fit_context = context

    def collect(self, images: torch.Tensor) -> None:
        """Accumulate statistics of a batch of normal training images (one-pass models, or
        gradient models with ``post_fit_pass``)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn in one pass")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Gradient models: the optimisers to step (in order)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn by gradient steps")

    def configure_schedulers(self, optimizers: list[torch.optim.Optimizer]) -> list[Any]:
        """Optional per-epoch learning-rate schedulers."""
        return []

    def training_step(self, images: torch.Tensor, optimizers: list[torch.optim.Optimizer] | None = None
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Gradient models: return the loss of a batch (or a dict with ``"loss"`` and extras).

        With ``manual_optimization`` the model steps ``optimizers`` itself and returns a
        detached loss.
        """
        raise NotImplementedError(f"{type(self).__name__} does not learn by gradient steps")

    def on_epoch_end(self, epoch: int) -> None:
        """Called after every training epoch."""

    def finalize(self) -> None:
        """Called once after training (one-pass: build the memory; gradient: optional)."""

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
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                module_name, _, buffer_name = key.rpartition(".")
                module = self.get_submodule(module_name) if module_name else self
                module.register_buffer(buffer_name, torch.empty_like(value, device=own[key].device))
        missing, unexpected = self.load_state_dict(state, strict=False)
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise ValueError(f"saved weights do not match {type(self).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
