"""A timm-style registry of named model configurations.

Each model file registers its configurations at import time::

    register(ModelSpec(name="padim", cls=Padim, family="memory", paper="...",
                       model_defaults={"backbone": "resnet18", ...},
                       train_defaults=TrainDefaults(num_epochs=1, batch_size=32)))

``create_model(name, **overrides)`` splits overrides into model and training keys, rejects
unknown keys with the list of valid ones, and builds the module.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any

FAMILIES = ("memory", "flow", "distillation", "reconstruction", "feature_adaptation", "foundation")


@dataclasses.dataclass(frozen=True)
class TrainDefaults:
    """The seed's per-model training defaults, plus the loop's extras."""

    num_epochs: int = 1
    batch_size: int = 32
    img_size: int = 256
    normalize: bool = True
    center_crop: int | None = None
    early_stopping_patience: int | None = None  # epochs without improvement before stopping
    early_stopping_target: float | None = None  # stop once validation AUROC reaches this
    validate_every: int | None = None  # epochs between validation AUROC checks (None: never)
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainDefaults))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type
    family: str
    paper: str
    model_defaults: dict[str, Any]
    train_defaults: TrainDefaults = TrainDefaults()
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        clash = set(self.model_defaults) & set(TRAIN_KEYS)
        if clash - {"normalize"}:
            raise ValueError(f"{self.name}: model keys {sorted(clash)} clash with training keys")


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """A configuration with every default filled in: what a run actually used."""

    name: str
    family: str
    model: dict[str, Any]
    train: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "model": dict(self.model), "train": dict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResolvedConfig":
        return cls(name=data["name"], family=data["family"], model=dict(data["model"]), train=dict(data["train"]))


_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    from adlib.models import load_all

    load_all()


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_models(family: str | None = None, pattern: str | None = None) -> list[str]:
    """Registered configuration names, optionally filtered by family and a glob pattern."""
    _ensure_loaded()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families are {', '.join(FAMILIES)}")
    names = sorted(_REGISTRY)
    if family is not None:
        names = [n for n in names if _REGISTRY[n].family == family]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def resolve_config(name: str, **overrides: Any) -> ResolvedConfig:
    """Fill defaults for ``name`` and apply overrides (model keys and training keys)."""
    spec = get_spec(name)
    model_cfg = dict(spec.model_defaults)
    train_cfg = dataclasses.asdict(spec.train_defaults)
    unknown = [k for k in overrides if k not in model_cfg and k not in train_cfg]
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}. Model options: {sorted(model_cfg)}; "
            f"training options: {sorted(train_cfg)}")
    for key, value in overrides.items():
        if key in train_cfg:
            train_cfg[key] = value
        if key in model_cfg:
            model_cfg[key] = value
    model_cfg["normalize"] = train_cfg["normalize"]
    return ResolvedConfig(name=name, family=spec.family, model=model_cfg, train=train_cfg)


def build_model(config: ResolvedConfig, *, pretrained: bool = True, backbone_dir: str | Path | None = None):
    """Instantiate the module of a resolved configuration.

    ``pretrained`` and ``backbone_dir`` say where frozen backbone weights come from; they are
    run-time facts, not part of the saved configuration.
    """
    spec = get_spec(config.name)
    return spec.cls(**config.model, pretrained=pretrained, backbone_dir=backbone_dir)


def create_model(name: str, *, pretrained: bool = True, backbone_dir: str | Path | None = None, **overrides: Any):
    """Build registered model ``name`` with ``overrides`` applied; returns the module.

    The resolved configuration is attached as ``model.resolved_config``.
    """
    config = resolve_config(name, **overrides)
    model = build_model(config, pretrained=pretrained, backbone_dir=backbone_dir)
    model.resolved_config = config
    return model
