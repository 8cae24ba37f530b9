"""Workflow configuration: validated against config/schema.yaml and the model registry; every
problem is reported at once, naming the key and what is allowed."""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Mapping

from adlib.workflow.paths import Paths

#: The layout whose data the prepare step generates itself (adlib.data.synthetic).
SYNTHETIC = "synthetic"


class ConfigError(ValueError):
    """The workflow configuration is invalid; the message lists every problem found."""


# ----------------------------------------------------------------------------------------------
# configuration
def load_schema(schema: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema as a dict (a mapping is returned as is, a path is read as YAML/JSON)."""
    if isinstance(schema, Mapping):
        return dict(schema)
    import yaml

    return yaml.safe_load(Path(schema).read_text(encoding="utf-8"))


def _defaults_validator(schema: dict[str, Any]):
    """A jsonschema validator that fills ``default`` values of missing properties in place."""
    import jsonschema

    base = jsonschema.validators.validator_for(schema)

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})(schema)


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _describe(error) -> str:
    """One readable line per schema error: the key, what is wrong, what is allowed."""
    where = f"config key '{_key(error.absolute_path)}'"
    kind, schema, value = error.validator, error.schema, error.instance
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        return f"{where}: unknown key(s) {unknown}; allowed keys: {', '.join(allowed)}"
    if kind == "enum":
        return f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(str, schema['enum']))}"
    if kind == "required":
        allowed = sorted(schema.get("properties", {}))
        return f"{where}: {error.message}; keys of this section: {', '.join(allowed)}"
    if kind == "oneOf" and list(error.absolute_path)[-1:] == ["categories"]:
        return f"{where}: {value!r} is neither \"all\" nor a non-empty list of category names"
    return f"{where}: {error.message}"


def validate_config(config: Mapping[str, Any], schema: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Check ``config`` against the schema and the model registry; return a copy with defaults filled.

    A model entry may be given as a bare name. Every problem is reported at once in a
    :class:`ConfigError` naming the key and the allowed values.
    """
    cfg = copy.deepcopy(dict(config))
    if isinstance(cfg.get("models"), list):
        cfg["models"] = [{"name": m} if isinstance(m, str) else m for m in cfg["models"]]
    validator = _defaults_validator(load_schema(schema))
    problems = [_describe(e) for e in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.path)))]
    if not problems:
        problems = _check_models(cfg) + _check_datasets(cfg)
    if problems:
        raise ConfigError("invalid workflow configuration:\n  - " + "\n  - ".join(problems))
    for model in cfg["models"]:
        model.setdefault("label", model["name"])
    return cfg


def _check_models(cfg: dict[str, Any]) -> list[str]:
    from adlib.models.registry import list_models, resolve_config

    valid = list_models()
    problems, labels = [], {}
    for i, model in enumerate(cfg["models"]):
        name = model["name"]
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"config key 'models[{i}].name': unknown model {name!r}{hint}; "
                            f"registered models: {', '.join(valid)}")
            continue
        try:
            resolve_config(name, **model["overrides"])
        except (ValueError, TypeError) as err:
            problems.append(f"config key 'models[{i}].overrides' ({name}): {err}")
        label = model.get("label", name)
        if label in labels:
            problems.append(f"config key 'models[{i}]': label {label!r} is used twice (models[{labels[label]}] "
                            "too); give one of them another 'label'")
        labels.setdefault(label, i)
    return problems


def _check_datasets(cfg: dict[str, Any]) -> list[str]:
    problems, names = [], {}
    for i, ds in enumerate(cfg["datasets"]):
        if ds["name"] in names:
            problems.append(f"config key 'datasets[{i}].name': data set name {ds['name']!r} is used twice")
        names.setdefault(ds["name"], i)
        if ds["layout"] == SYNTHETIC:
            if ds["categories"] == "all":
                problems.append(f"config key 'datasets[{i}].categories': a synthetic data set needs an explicit "
                                "list of category names (they are generated, nothing can be found on disk)")
            if "root" in ds:
                problems.append(f"config key 'datasets[{i}].root': not used by layout 'synthetic' (generated "
                                f"data go to {Paths().data}/{ds['name']}); remove it")
        elif "root" not in ds:
            problems.append(f"config key 'datasets[{i}].root': required for layout {ds['layout']!r} "
                            "(the folder that holds the data set)")
        allowed = layout_options(ds["layout"])
        unknown = sorted(set(ds["options"]) - set(allowed))
        if unknown:
            hint = "; the seed of the data is the top-level key 'data_seed'" if "seed" in unknown else ""
            problems.append(f"config key 'datasets[{i}].options': unknown option(s) {unknown} for layout "
                            f"{ds['layout']!r}; allowed options: {', '.join(allowed) or '(none)'}{hint}")
    return problems


def layout_options(layout: str) -> list[str]:
    """Keyword options the indexer of ``layout`` accepts (what a data set's ``options`` may hold)."""
    import inspect

    from adlib.data import LAYOUTS

    params = inspect.signature(LAYOUTS[layout]).parameters.values()
    # "seed" is the config's data_seed (it seeds every data split), "dataset" the entry's name
    return sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("dataset", "seed"))


