"""Checking a configuration before any job runs: unknown keys, value types, training ranges, and
whatever the model's constructor refuses (layer names a backbone lacks, sizes it cannot take,
impossible option combinations), and tiling values (:func:`adlib.tiling.tiling_problems`; a
tiled model is checked at its tile size and must produce maps). Every problem is returned at
once, each naming its key.

The constructor check builds the model on PyTorch's ``meta`` device with random-init weights
(no memory is allocated and no weight file is read, so it takes milliseconds to a second) and
runs ``predict`` on a meta batch of the configured size: the models' own size checks (patch
multiples, pooling larger than a feature map, fixed transformer input sizes) raise ``ValueError``
there. Other errors of a meta forward (an untrained memory model, an operation meta tensors do
not support) say nothing about the configuration and are ignored.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: (key, low, high, low inclusive) ranges of training keys; None means "no bound"
_TRAIN_RANGES = {
    "num_epochs": (1, None), "max_steps": (1, None), "batch_size": (1, None), "img_size": (16, 8192),
    "center_crop": (16, 8192), "grad_clip_norm": (0, None), "early_stopping_patience": (1, None),
    "validate_every": (1, None), "validation_fraction": (0, 1), "labelled_fraction": (0, 1),
    "micro_batch_size": (1, None),
}
_EXCLUSIVE_LOW = {"grad_clip_norm"}
_EXCLUSIVE_HIGH = {"validation_fraction", "labelled_fraction"}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem with a configuration: the option's key (None: the configuration as a whole)."""

    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


def check_config(name: str, overrides: Mapping[str, Any] | None = None, *, build: bool = True) -> list[Problem]:
    """Every problem of registered configuration ``name`` with ``overrides``; [] when it is valid."""
    from adlib.models.registry import TrainDefaults, get_spec, resolve_config
    from adlib.tiling import model_input_side, tiling_problems

    overrides = dict(overrides or {})
    try:
        spec = get_spec(name)
        config = resolve_config(name, **overrides)
    except (KeyError, ValueError) as err:
        return [Problem(None, str(err))]
    hints = _hints(spec.cls.__init__)
    train_hints = typing.get_type_hints(TrainDefaults)
    problems = []
    for key, value in overrides.items():
        hint = train_hints.get(key) if key in config.train else hints.get(key)
        if hint is not None and not _matches(value, hint):
            problems.append(Problem(key, f"{value!r} is not {_describe(hint)}" + _yaml_hint(value)))
    bad = {p.key for p in problems}
    problems += [Problem(key, message) for key, message in _train_ranges(config.train) if key not in bad]
    problems += [Problem(key, message) for key, message in tiling_problems(config.train) if key not in bad]
    if problems or not build:
        return problems
    side = model_input_side(config.train)
    try:
        model = _build_on_meta(config)
        model.check_input_size((side, side))
    except (ValueError, TypeError, RuntimeError, KeyError, NotImplementedError) as err:
        return [Problem(None, str(err).strip())]
    if config.train.get("tile_size") is not None and not model.produces_maps:
        return [Problem("tile_size", f"{spec.name} scores whole images only (no anomaly maps), so it cannot be "
                                     "tiled: drop tile_size, or choose a model that produces maps")]
    if config.train.get("micro_batch_size") is not None and model.learns_by == "gradient":
        problem = _micro_batch_problem(model)
        if problem:
            problems.append(Problem("micro_batch_size", problem))
    try:
        _predict_on_meta(model, side)
    except (ValueError, TypeError) as err:
        problems.append(Problem(None, str(err).strip()))
    except Exception:  # noqa: BLE001 - see the module docstring
        pass
    return problems


def _micro_batch_problem(model) -> str | None:
    """Whether a meta-built gradient model can train in micro-batches (its optimisers, where
    they can be built before a fit, say how many step on each batch)."""
    from adlib.training import as_specs, micro_batch_problem

    try:
        specs = as_specs(model.configure_optimizers())
    except Exception:  # noqa: BLE001 - optimisers that need the fit's schedule: the loop checks them
        specs = []
    return micro_batch_problem(model, specs)


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a configuration needs on disk to train: weight files (catalog names) and the
    auxiliary image sets of its streams."""

    weights: tuple[str, ...]
    streams: tuple  # AuxStream


def requirements(name: str, overrides: Mapping[str, Any] | None = None) -> Requirements:
    """The weight files and auxiliary streams of a (valid) configuration, from a meta build."""
    from adlib.models.registry import resolve_config

    model = _build_on_meta(resolve_config(name, **dict(overrides or {})))
    return Requirements(tuple(model.required_weights()), tuple(model.auxiliary_streams()))


def missing_requirements(name: str, overrides: Mapping[str, Any] | None, *, backbone_dir, data_root) -> list[str]:
    """What configuration ``name`` needs but cannot find (weights, auxiliary folders), with what
    to do about each; [] when everything is in place."""
    from adlib.backbones.inventory import list_backbones
    from adlib.backbones.locate import MissingWeightsError, resolve_weights
    from adlib.data import DataError
    from adlib.data.auxiliary import resolve_aux_source

    needs = requirements(name, overrides)
    problems = []
    for weights in needs.weights:
        try:
            resolve_weights(weights, backbone_dir)
        except MissingWeightsError:
            present = sorted((row["name"] for row in list_backbones(backbone_dir) if row["present"]),
                             key=lambda n: (n != "tf_efficientnet_lite0", n))
            hint = (f"; weights present now: {', '.join(present)} (e.g. overrides: {{backbone: {present[0]}}})"
                    if present else "")
            problems.append(f"no weights for {weights!r}: put the file in the backbone directory {backbone_dir} "
                            f"(`adlib backbones list` names it and how to fetch it){hint}")
    for stream in needs.streams:
        if stream.fallback is not None:
            continue
        try:
            resolve_aux_source(stream.source, data_root)
        except DataError as err:
            problems.append(f"needs auxiliary {stream.source!r} images under the data root {data_root} and found "
                            f"none. To fix: {str(err).split('To fix: ')[-1]}")
    return problems


@functools.lru_cache(maxsize=64)
def _cached_meta_model(config_json: str):
    import json

    from adlib.models.registry import ResolvedConfig

    return _meta_model(ResolvedConfig.from_dict(json.loads(config_json)))


def _build_on_meta(config):
    import json

    return _cached_meta_model(json.dumps(config.to_dict(), sort_keys=True, default=str))


def _meta_model(config):
    import torch

    from adlib.models.registry import build_model

    logger = logging.getLogger("adlib.backbones")
    level = logger.level
    logger.setLevel(logging.ERROR)  # random-init warnings mean nothing here
    try:
        with torch.device("meta"):
            return build_model(config, pretrained=False)
    finally:
        logger.setLevel(level)


def _predict_on_meta(model, side: int) -> None:
    import torch

    with torch.device("meta"), torch.no_grad():
        model.eval().predict(torch.empty(2, 3, side, side))


def _train_ranges(train: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, (low, high) in _TRAIN_RANGES.items():
        value = train.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        too_low = low is not None and (value <= low if key in _EXCLUSIVE_LOW else value < low)
        too_high = high is not None and (value >= high if key in _EXCLUSIVE_HIGH else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if key in _EXCLUSIVE_LOW else '>='} {low}"
            hi = "" if high is None else f"{'<' if key in _EXCLUSIVE_HIGH else '<='} {high}"
            out.append((key, f"{value!r} is out of range (must be {' and '.join(b for b in (lo, hi) if b)})"))
    if train.get("num_epochs") is None and train.get("max_steps") is None:
        out.append(("num_epochs", "num_epochs and max_steps are both null: give a training budget"))
    crop, size = train.get("center_crop"), train.get("img_size")
    if isinstance(crop, int) and isinstance(size, int) and crop > size:
        out.append(("center_crop", f"{crop} is larger than img_size={size}: the crop is cut from the resized image"))
    return out


def _yaml_hint(value: Any) -> str:
    """YAML reads ``1e-4`` as a string; say how to write the number."""
    try:
        number = float(value) if isinstance(value, str) else None
    except ValueError:
        number = None
    return f" (YAML reads {value!r} as text: write {number!r})" if number is not None else ""


def _hints(function) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an annotation that cannot be resolved: skip type checks for this class
        return {}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML/JSON-like ``value`` fits the type ``hint`` (unknown hints accept anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    container = origin or hint
    if container in (dict, Mapping) or (isinstance(container, type) and issubclass(container, Mapping)):
        return isinstance(value, Mapping)
    if container in (list, tuple, Sequence) or (isinstance(container, type) and issubclass(container, Sequence)):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if hint in names:
        return names[hint]
    container = origin or hint
    if container in (list, tuple, Sequence):
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if container in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))
