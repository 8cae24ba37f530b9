"""A timm-style registry of named model configurations.

A configuration's model defaults are written once, in its class's ``__init__`` signature; a
:class:`ModelSpec` holds only what differs from them, and a variant only what differs from its
base configuration::

    register(ModelSpec(name="fastflow", cls=Fastflow, family="flow", paper="...",
                       train=TrainDefaults(num_epochs=500)))
    register_variant("fastflow-resnet18", base="fastflow", model={"backbone": "resnet18"},
                     description="...")

``create_model(name, **overrides)`` splits overrides into model and training keys, rejects
unknown keys with the list of valid ones, and builds the module.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from pathlib import Path
from typing import Any, Literal, Mapping

FAMILIES = ("memory", "flow", "distillation", "reconstruction", "feature_adaptation", "foundation")
SCOPES = ("category", "dataset")
TRAIN_LABELS = ("normal", "labelled")
#: constructor arguments that are run-time facts, not part of a configuration
RUNTIME_ARGS = ("pretrained", "backbone_dir")
#: training values a constructor may also take (filled in from the configuration, not model keys):
#: ``img_size`` is the side the model sees (``center_crop`` when set), for networks whose layers
#: depend on it (GANomaly's DCGAN pyramid)
CONFIG_ARGS = ("img_size",)


@dataclasses.dataclass(frozen=True)
class TrainDefaults:
    """A configuration's training defaults (the keys the loop and the data layer read)."""

    num_epochs: int | None = 1  # None: the budget is max_steps alone
    batch_size: int = 32
    img_size: int = 256
    center_crop: int | None = None  # resize to img_size, then cut the central square
    max_steps: int | None = None  # stop after this many optimiser steps (whichever budget ends first)
    grad_clip_norm: float | None = None  # clip each optimiser's gradient norm to this
    validation_fraction: float = 0.0  # normal training images held out as the validation split
    labelled_fraction: float = 0.0  # labelled configurations: share of anomalous test images moved to train
    early_stopping_patience: int | None = None  # validation checks without improvement before stopping
    early_stopping_target: float | None = None  # stop once the validation metric reaches this
    validate_every: int | None = None  # epochs between validation checks (None: never)
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    micro_batch_size: int | None = None  # CPU: cut each batch into parts this big, one optimiser step (ignored on CUDA)
    # tiling (docs/tiling.md): set tile_size to train on tiles and predict tile by tile on full images
    tile_size: int | None = None  # side of a tile, the model's input (img_size and center_crop are unused)
    tile_stride: int | None = None  # pixels between tiles (None: tile_size, no overlap)
    tile_blend: Literal["mean", "max", "gaussian"] = "mean"  # how overlapping tile maps combine
    tiles_per_image: int | None = None  # training: a seeded random subset of each image's tiles (None: all)
    tile_image_size: int | tuple[int, int] | None = None  # images' long side, or (height, width); None: own size


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainDefaults))


def _plain(value: Any) -> Any:
    """Defaults as JSON would store them (tuples become lists), so saved configs compare equal."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def signature_defaults(cls: type) -> dict[str, Any]:
    """The model keys of ``cls`` and their defaults, read from its ``__init__`` signature."""
    out = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.name in RUNTIME_ARGS + CONFIG_ARGS or param.kind in (param.VAR_POSITIONAL,
                                                                                param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"{cls.__name__}.__init__ argument {param.name!r} has no default: every model "
                            "argument needs one (it is the configuration's default)")
        out[param.name] = _plain(param.default)
    return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One named configuration: a class, what differs from its defaults, and registry facts.

    ``scope="dataset"``: one model trains on every category of a data set (the multi-class
    setting) and is evaluated per category. ``train_labels="labelled"``: the configuration also
    trains on labelled anomalous images (moved out of the test split, see docs/datasets.md).
    """

    name: str
    cls: type
    family: str
    paper: str
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # differences from the signature
    train: TrainDefaults = TrainDefaults()
    description: str = ""
    scope: Literal["category", "dataset"] = "category"
    train_labels: Literal["normal", "labelled"] = "normal"
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.scope not in SCOPES or self.train_labels not in TRAIN_LABELS:
            raise ValueError(f"{self.name}: scope must be one of {SCOPES}, train_labels one of {TRAIN_LABELS}")
        defaults = signature_defaults(self.cls)
        clash = set(defaults) & set(TRAIN_KEYS)
        if clash:
            raise ValueError(f"{self.name}: model keys {sorted(clash)} clash with training keys")
        unknown = set(self.model) - set(defaults)
        if unknown:
            raise ValueError(f"{self.name}: {sorted(unknown)} are not arguments of {self.cls.__name__}")

    @property
    def model_defaults(self) -> dict[str, Any]:
        """Every model key with this configuration's value."""
        return {**signature_defaults(self.cls), **_plain(dict(self.model))}


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
_ALIASES: dict[str, str] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(spec: ModelSpec) -> ModelSpec:
    for name in (spec.name, *spec.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"model name {name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    _ALIASES.update({alias: spec.name for alias in spec.aliases})
    return spec


def register_variant(name: str, base: str, *, model: Mapping[str, Any] | None = None,
                     train: Mapping[str, Any] | None = None, description: str = "", **facts: Any) -> ModelSpec:
    """Register ``name`` as ``base`` with some model and training values changed (and optionally
    other facts: ``scope``, ``train_labels``, ``aliases``, ``paper``)."""
    parent = _REGISTRY[base]
    return register(dataclasses.replace(
        parent, name=name, model={**parent.model, **(model or {})},
        train=dataclasses.replace(parent.train, **(train or {})), description=description or parent.description,
        **{"aliases": (), **facts}))


def _ensure_loaded() -> None:
    from adlib.models import load_all

    load_all()


def canonical_name(name: str) -> str:
    """The registered name of ``name`` (an alias resolves to its configuration)."""
    _ensure_loaded()
    return _ALIASES.get(name, name)


def get_spec(name: str) -> ModelSpec:
    name = canonical_name(name)
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, [*_REGISTRY, *_ALIASES], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def aliases_of(name: str) -> list[str]:
    _ensure_loaded()
    return sorted(alias for alias, target in _ALIASES.items() if target == name)


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
    model_cfg = spec.model_defaults
    train_cfg = dataclasses.asdict(spec.train)
    unknown = [k for k in overrides if k not in model_cfg and k not in train_cfg]
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {spec.name!r}. Model options: {sorted(model_cfg)}; "
            f"training options: {sorted(train_cfg)}")
    for key, value in overrides.items():
        (train_cfg if key in train_cfg else model_cfg)[key] = _plain(value)
    return ResolvedConfig(name=spec.name, family=spec.family, model=model_cfg, train=train_cfg)


def build_model(config: ResolvedConfig, *, pretrained: bool = True, backbone_dir: str | Path | None = None):
    """Instantiate the module of a resolved configuration.

    ``pretrained`` and ``backbone_dir`` say where frozen weights come from; they are run-time
    facts, not part of the saved configuration. ``img_size`` (the side the model sees) comes from
    the training values. Each is passed only to classes that take it.
    """
    spec = get_spec(config.name)
    accepted = inspect.signature(spec.cls.__init__).parameters
    side = int(config.train.get("center_crop") or config.train.get("img_size") or 256)
    runtime = {k: v for k, v in (("pretrained", pretrained), ("backbone_dir", backbone_dir), ("img_size", side))
               if k in accepted}
    model = spec.cls(**config.model, **runtime)
    model.config = config
    return model


def create_model(name: str, *, pretrained: bool = True, backbone_dir: str | Path | None = None, **overrides: Any):
    """Build registered model ``name`` with ``overrides`` applied; ``model.config`` holds the
    resolved configuration."""
    return build_model(resolve_config(name, **overrides), pretrained=pretrained, backbone_dir=backbone_dir)
