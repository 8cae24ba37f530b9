"""Offline weight resolution and loading; nothing is ever downloaded.

Order: conventional files in the backbone directory (see :mod:`adlib.backbones.catalog`), then
installed pip weight packages. Files are read with safetensors or
``torch.load(weights_only=True)`` only, so no arbitrary Python object is ever unpickled. Keys are
mapped to timm's layout when needed (:mod:`adlib.backbones.mapping`) and checked against the
architecture (every key, every shape) before loading; a features-only model takes the subset
of the full model's weights it has.
"""
from __future__ import annotations

import importlib
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from adlib.backbones.catalog import arch_name, catalog_entry
from adlib.backbones.locate import (MissingWeightsError, WeightsSource, cached_sha256, find_in_dir, missing_message,
                                    package_file, resolve_weights)
from adlib.backbones.mapping import CONVERTERS, MappingError, StateDict, unwrap_state_dict

log = logging.getLogger(__name__)

#: timm kwargs that select a features-only wrapper; the full reference model is built without them
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "flatten_sequential")
_HEAD_KWARGS = ("num_classes", "global_pool")
_MAX_LISTED = 8


class WeightsFileError(ValueError):
    """A weight file exists but cannot be used (unreadable, pickled objects, wrong keys/shapes)."""


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a weight file: safetensors, or torch.load(weights_only=True) for .pth/.bin/...

    Raises WeightsFileError naming the file for unreadable files, pickled Python objects (a
    whole model saved with ``torch.save(model)``) and checkpoints without a state dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsFileError(
            f"{path}: holds pickled Python objects, not a plain state dict, and adlib never unpickles "
            "arbitrary objects (unpickling runs whatever code the file carries). Only if you trust where the "
            "file comes from, convert it once on a machine you can afford to risk: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'converted.pth'), or save it as "
            f"safetensors. Otherwise get the file from its original source. ({_first_line(exc)})") from exc
    except Exception as exc:  # truncated/corrupt archives raise RuntimeError, EOFError, SafetensorError...
        raise WeightsFileError(
            f"{path}: cannot read this weight file ({type(exc).__name__}: {_first_line(exc)}). "
            "It may be truncated or corrupt: copy it again and check it with `adlib backbones verify`.") from exc
    try:
        return unwrap_state_dict(obj)
    except MappingError as exc:
        raise WeightsFileError(f"{path}: {exc}") from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's text, without terminal colour codes, at most 200 chars."""
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:200] if text else ""


# converting and checking -------------------------------------------------------------------------
def _reference_model(name: str, timm_kwargs: dict[str, Any]) -> nn.Module:
    """Full (classifier-bearing) timm model on the meta device: names and shapes, no memory."""
    kwargs = {k: v for k, v in timm_kwargs.items() if k not in _FEATURE_KWARGS + _HEAD_KWARGS}
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # some architectures cannot be built on the meta device; use the CPU
        return timm.create_model(name, pretrained=False, **kwargs)


def _key_translation(target_keys: list[str], reference_keys: set[str]) -> dict[str, str]:
    """target key -> reference (full model) key. Features-only wrappers may prefix ``model.``
    or flatten module paths with ``_``."""
    normalised = {k.replace(".", "_"): k for k in reference_keys}
    out = {}
    for key in target_keys:
        stripped = key[len("model."):] if key.startswith("model.") else key
        ref = key if key in reference_keys else stripped if stripped in reference_keys else \
            normalised.get(stripped.replace(".", "_"))
        if ref is None:
            raise WeightsFileError(f"model parameter {key!r} has no counterpart in the full architecture")
        out[key] = ref
    return out


def _problems(candidate: StateDict, translation: dict[str, str], target_shapes: dict[str, torch.Size],
              reference_keys: set[str]) -> dict[str, list[str]]:
    """Mismatches between a candidate state dict and the model, by kind ({} when it fits)."""
    found = {
        "missing keys": [ref for ref in translation.values() if ref not in candidate],
        "unexpected keys": sorted(set(candidate) - reference_keys),
        "wrong shapes": [f"{ref}: file {tuple(candidate[ref].shape)} vs model {tuple(target_shapes[key])}"
                         for key, ref in translation.items()
                         if ref in candidate and candidate[ref].shape != target_shapes[key]],
    }
    return {label: items for label, items in found.items() if items}


def _describe(problems: dict[str, list[str]]) -> str:
    lines = []
    for label, items in problems.items():
        more = f"; ... ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
        lines.append(f"{label} ({len(items)}): " + "; ".join(items[:_MAX_LISTED]) + more)
    return "\n  ".join(lines)


def _candidates(raw: StateDict, name: str, reference: nn.Module, reference_keys: set[str]):
    """(format, state dict or MappingError) attempts: the file as is and each known layout's
    mapping, each also followed by timm's own checkpoint filter for the architecture."""
    module = importlib.import_module(timm.models.model_entrypoint(arch_name(name)).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    bases: list[tuple[str, StateDict | MappingError]] = [("timm", raw)]
    for fmt, detect, convert in CONVERTERS:
        if detect(raw):
            try:
                bases.append((fmt, convert(raw, reference_keys)))
            except MappingError as exc:
                bases.append((fmt, exc))
    for fmt, state in bases:
        yield fmt, state
        if filter_fn is not None and not isinstance(state, Exception):
            label = "timm-filter" if fmt == "timm" else f"{fmt}+timm-filter"
            try:
                yield label, filter_fn(dict(state), reference)
            except Exception as exc:  # a filter written for another layout may choke on this one
                yield label, MappingError(f"timm checkpoint_filter_fn failed: {exc}")


def timm_state_dict(raw: StateDict, name: str, path: Path, target: nn.Module | None = None,
                    **timm_kwargs: Any) -> tuple[StateDict, str]:
    """Map ``raw`` to the state dict of ``target`` (default: the full timm model ``name``).

    Returns (state dict keyed like ``target``, format name). Raises WeightsFileError naming the
    file and the mismatched keys when no known layout fits.
    """
    reference = _reference_model(arch_name(name), timm_kwargs)
    reference_keys = set(reference.state_dict())
    target_sd = (target if target is not None else reference).state_dict()
    translation = _key_translation(list(target_sd), reference_keys)
    shapes = {k: v.shape for k, v in target_sd.items()}
    attempts: list[tuple[int, str, dict[str, list[str]]]] = []
    for fmt, candidate in _candidates(raw, name, reference, reference_keys):
        if isinstance(candidate, Exception):
            attempts.append((len(raw), fmt, {"mapping failed": [str(candidate)]}))
            continue
        problems = _problems(candidate, translation, shapes, reference_keys)
        if not problems:
            return {key: candidate[ref] for key, ref in translation.items()}, fmt
        attempts.append((sum(map(len, problems.values())), fmt, problems))
    _, fmt, problems = min(attempts, key=lambda a: a[0])
    raise WeightsFileError(
        f"{path}: does not fit timm architecture {arch_name(name)!r} (closest layout: {fmt}):\n  "
        + _describe(problems)
        + _transformer_difference(raw, reference.state_dict(), arch_name(name))
        + "\nThe file holds weights for another architecture or variant. Fetch the right file with:\n    "
        + catalog_entry(name).fetch)


def _transformer_shape(state: StateDict) -> tuple[int, int, int] | None:
    """(embedding width, blocks, register tokens) of a ViT state dict in timm's, the official
    DINOv2 or the transformers layout; None for other networks."""
    cls_token = next((v for k, v in state.items() if k.endswith("cls_token")), None)
    if cls_token is None:
        return None
    blocks = {m.group(1) for k in state if (m := re.search(r"(?:^|\.)(?:blocks|layer)\.(\d+)\.", k))}
    registers = next((int(v.shape[1]) for k, v in state.items() if k.endswith(("reg_token", "register_tokens"))), 0)
    return int(cls_token.shape[-1]), len(blocks), registers


def _transformer_difference(raw: StateDict, reference: StateDict, arch: str) -> str:
    """A line saying how a ViT file differs from the architecture (width, depth, registers)."""
    file_shape, model_shape = _transformer_shape(raw), _transformer_shape(reference)
    if file_shape is None or model_shape is None or file_shape == model_shape:
        return ""

    def text(shape: tuple[int, int, int]) -> str:
        return f"embedding width {shape[0]}, {shape[1]} blocks, {shape[2]} register tokens"

    return f"\nThe file is a ViT with {text(file_shape)}; {arch} has {text(model_shape)}."


def load_checked(model: nn.Module, state: StateDict, path: Path) -> None:
    """Strict load into a plain module with a clear error naming the file and the bad keys."""
    target_sd = model.state_dict()
    translation = {k: k for k in target_sd}
    problems = _problems(state, translation, {k: v.shape for k, v in target_sd.items()}, set(target_sd))
    if problems:
        raise WeightsFileError(f"{path}: does not fit {type(model).__name__}:\n  {_describe(problems)}")
    model.load_state_dict(state, strict=True)


# public entry points ---------------------------------------------------------------------------
def read_weights(name: str, backbone_dir: str | Path | None, target: nn.Module | None = None,
                 **timm_kwargs: Any) -> tuple[StateDict, dict[str, Any]]:
    """Resolve and read ``name``'s weights, mapped to timm's full model (or to ``target``'s keys).

    Returns (state dict, provenance). For non-timm names the file's state dict is returned as is.
    """
    source = resolve_weights(name, backbone_dir)
    raw = read_state_dict(source.path)
    if not _is_timm(name):
        return raw, source.provenance("state_dict")
    state, fmt = timm_state_dict(raw, name, source.path, target, **timm_kwargs)
    return state, source.provenance(fmt)


def load_pretrained(model: nn.Module, name: str, backbone_dir: str | Path | None, **timm_kwargs: Any) -> dict[str, Any]:
    """Load offline weights for ``name`` into ``model``; returns provenance
    ``{"backbone", "source" (file path, or pip:<package>:<path>), "sha256", "format"}``.

    ``model`` is the timm model ``name`` built with ``timm_kwargs`` (features-only models take
    their subset of the full model's weights), or any module for model-specific names such as
    ``efficientad_teacher_small`` (strict load of the file's keys).
    """
    if _is_timm(name):
        state, provenance = read_weights(name, backbone_dir, model, **timm_kwargs)
        model.load_state_dict(state, strict=True)
    else:
        source = resolve_weights(name, backbone_dir)
        load_checked(model, read_state_dict(source.path), source.path)
        provenance = source.provenance("state_dict")
    log.info("backbone %s: loaded %s (sha256 %s)", name, provenance["source"], provenance["sha256"][:12])
    return provenance


def _is_timm(name: str) -> bool:
    entry = catalog_entry(name)
    return entry.timm_arch and timm.is_model(arch_name(name))
