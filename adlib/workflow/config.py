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

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid workflow configuration:\n  - " + "\n  - ".join(self.problems))


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


def validate_config(config: Mapping[str, Any], schema: str | os.PathLike | Mapping[str, Any], *,
                    preflight: bool = False) -> dict[str, Any]:
    """Check ``config`` against the schema and the model registry; return a copy with defaults filled.

    A model entry may be given as a bare name. Every model's overrides are checked for type,
    range and what the model itself refuses (layer names, sizes). With ``preflight`` the weight
    files and auxiliary folders every model needs are looked up too. Every problem is reported
    at once in a :class:`ConfigError` naming the key and what to do.
    """
    cfg, problems = validated(config, schema)
    if preflight and not problems:
        problems = check_requirements(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def validated(config: Mapping[str, Any], schema) -> tuple[dict[str, Any], list[str]]:
    """The config with defaults filled, and every schema, model and data set problem."""
    cfg = copy.deepcopy(dict(config))
    if isinstance(cfg.get("models"), list):
        cfg["models"] = [{"name": m} if isinstance(m, str) else m for m in cfg["models"]]
    validator = _defaults_validator(load_schema(schema))
    problems = [_describe(e) for e in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.path)))]
    models = [m for m in cfg.get("models") or [] if isinstance(m, dict) and isinstance(m.get("name"), str)
              and isinstance(m.get("overrides", {}), dict)]
    datasets = [d for d in cfg.get("datasets") or [] if isinstance(d, dict) and isinstance(d.get("name"), str)
                and d.get("layout") in _layouts() and isinstance(d.get("options", {}), dict)]
    problems += _check_models(cfg, models) + _check_datasets(datasets)
    for model in models:
        model.setdefault("label", model["name"])
    return cfg, problems


def _layouts() -> list[str]:
    from adlib.data import LAYOUTS

    return list(LAYOUTS)


def _check_models(cfg: dict[str, Any], models: list[dict]) -> list[str]:
    from adlib.models.checks import check_config
    from adlib.models.registry import canonical_name, list_models

    valid = list_models()
    problems, labels = [], {}
    global_size = cfg.get("img_size")
    for i, model in enumerate(cfg.get("models") or []):
        if model not in models:
            continue
        name = model["name"]
        if canonical_name(name) not in valid:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"config key 'models[{i}].name': unknown model {name!r}{hint}; "
                            f"registered models: {', '.join(valid)}")
            continue
        overrides = dict(model.get("overrides") or {})
        forced = isinstance(global_size, int) and "img_size" not in overrides
        if forced:
            overrides["img_size"] = global_size
        for problem in check_config(name, overrides):
            if forced and problem.key in ("img_size", None):
                where = f"config key 'img_size' (forced on models[{i}], {name})"
            else:
                where = f"config key 'models[{i}].overrides{'.' + problem.key if problem.key else ''}' ({name})"
            problems.append(f"{where}: {problem.message}")
        label = model.get("label", name)
        if label in labels:
            problems.append(f"config key 'models[{i}]': label {label!r} is used twice (models[{labels[label]}] "
                            "too); give one of them another 'label'")
        labels.setdefault(label, i)
    return problems


def check_requirements(cfg: Mapping[str, Any]) -> list[str]:
    """Weight files and auxiliary folders every model of a valid config needs, looked up now."""
    from adlib.models.checks import missing_requirements

    if not cfg.get("pretrained", True):
        return []
    problems = []
    for i, model in enumerate(cfg["models"]):
        overrides = dict(model["overrides"])
        if cfg.get("img_size") is not None:
            overrides.setdefault("img_size", cfg["img_size"])
        for problem in missing_requirements(model["name"], overrides, backbone_dir=cfg["backbone_dir"],
                                            data_root=cfg["data_root"]):
            problems.append(f"models[{i}] ({model['label']}): {problem}")
    return problems


#: layout options that name folders inside the data set (never outside it)
_FOLDER_OPTIONS = ("folder", "normal_dirs", "abnormal_dirs", "mask_dir", "normal_test_dirs")


def _check_datasets(datasets: list[dict]) -> list[str]:
    problems, names = [], {}
    for i, ds in enumerate(datasets):
        ds.setdefault("options", {})
        ds.setdefault("categories", "all")
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
        for key in _FOLDER_OPTIONS:
            values = ds["options"].get(key)
            for value in [values] if isinstance(values, str) else values or []:
                if isinstance(value, str) and (os.path.isabs(value) or ".." in Path(value).parts):
                    problems.append(f"config key 'datasets[{i}].options.{key}': {value!r} leaves the data set folder; "
                                    "give a folder name relative to the data set (no '..', not absolute)")
    return problems


def layout_options(layout: str) -> list[str]:
    """Keyword options the indexer of ``layout`` accepts (what a data set's ``options`` may hold)."""
    import inspect

    from adlib.data import LAYOUTS

    params = inspect.signature(LAYOUTS[layout]).parameters.values()
    # "seed" is the config's data_seed (it seeds every data split), "dataset" the entry's name
    return sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("dataset", "seed"))


