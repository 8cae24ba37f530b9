"""What the Snakemake workflow needs from Python: config validation, the run table, source
fingerprints and the job context of the script adapters.

The Snakefile calls :func:`validate_config` and :func:`build_run_table` once, in
``rules/common.smk``; rules only look things up in the returned :class:`RunTable`. Everything
here is plain Python so it is tested without Snakemake.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

#: The layout whose data the prepare step generates itself (adlib.data.synthetic).
SYNTHETIC = "synthetic"
#: Where generated data, prepared manifests and runs live (literal prefixes of the rules' paths).
DATA_DIR = "results/data"
PREPARED_DIR = "results/prepared"
RUNS_DIR = "results/runs"

#: Modules (besides the model's own file and what it imports) whose edits retrain every model.
TRAIN_SHARED_MODULES = ("adlib.training", "adlib.artifacts", "adlib.models.base", "adlib.models.registry",
                        "adlib.data")
#: Hashed but not followed for training: train_run lives here beside the evaluation steps, whose
#: imports (metrics, plots) must not retrain every model when they change.
TRAIN_SHARED_FILES = ("adlib.pipeline",)
#: Modules whose edits re-evaluate every run.
EVAL_SHARED_MODULES = ("adlib.pipeline", "adlib.evaluation")
#: Modules never followed when collecting a model's sources: importing them pulls in every model.
_NOT_FOLLOWED = {"adlib", "adlib.models"}


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
                                f"data go to {DATA_DIR}/{ds['name']}); remove it")
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


# ----------------------------------------------------------------------------------------------
# categories
def resolve_categories(dataset: Mapping[str, Any]) -> list[str]:
    """The categories of one validated data set entry; "all" is looked up under its root."""
    categories = dataset.get("categories", "all")
    if dataset["layout"] == SYNTHETIC:
        return list(categories)
    available = available_categories(dataset)
    if categories == "all":
        if not available:
            raise ConfigError(f"data set {dataset['name']!r}: no categories found under {dataset['root']} "
                              f"(layout {dataset['layout']}); check 'root' or list the categories explicitly")
        return available
    if available is not None:
        missing = [c for c in categories if c not in available]
        if missing:
            raise ConfigError(f"data set {dataset['name']!r}: unknown categories {missing} under "
                              f"{dataset['root']}; available categories: {', '.join(available) or '(none)'}")
    return list(categories)


def available_categories(dataset: Mapping[str, Any]) -> list[str] | None:
    """Categories found under the root, or None when the layout cannot list them and the config
    names them itself."""
    from adlib.data import DataError, list_categories

    layout, root = dataset["layout"], Path(dataset["root"])
    if not root.is_dir():
        raise ConfigError(f"data set {dataset['name']!r}: root folder {root} does not exist; "
                          "fix 'root' in the config (relative paths start at the working directory)")
    try:
        return sorted(list_categories(layout, root, dataset=dataset["name"], **dataset.get("options", {})))
    except (DataError, OSError, ValueError) as err:
        if dataset.get("categories", "all") == "all":
            raise ConfigError(f"data set {dataset['name']!r}: cannot list the categories under {root}: {err}")
        return None


# ----------------------------------------------------------------------------------------------
# run table
@dataclasses.dataclass(frozen=True)
class Run:
    """One benchmark run: a model (by label) trained on one category of one data set with one seed."""

    dataset: str
    category: str
    model: str
    seed: int
    img_size: int

    @property
    def run_dir(self) -> str:
        return f"{RUNS_DIR}/{self.dataset}/{self.category}/{self.model}/{self.seed}"


class RunTable:
    """Every run of a validated config, with the per-dataset and per-model facts rules look up."""

    def __init__(self, config: Mapping[str, Any], categories: Mapping[str, list[str]]):
        self.config = config
        self.datasets = {ds["name"]: ds for ds in config["datasets"]}
        self.models = {m["label"]: m for m in config["models"]}
        self.categories = dict(categories)
        self.runs: list[Run] = []
        for ds in config["datasets"]:
            for category in self.categories[ds["name"]]:
                for model in config["models"]:
                    size = int(model["overrides"].get("img_size", config["img_size"]))
                    for seed in config["seeds"]:
                        self.runs.append(Run(ds["name"], category, model["label"], int(seed), size))
        self._by_key = {(r.dataset, r.category, r.model, r.seed): r for r in self.runs}

    def __len__(self) -> int:
        return len(self.runs)

    # -- lists for rule "all" and the aggregates
    def run_dirs(self) -> list[str]:
        return [r.run_dir for r in self.runs]

    def run_files(self, name: str) -> list[str]:
        return [f"{r.run_dir}/{name}" for r in self.runs]

    # -- per-wildcard look-ups
    def run(self, dataset: str, category: str, model: str, seed: int | str) -> Run:
        return self._by_key[(dataset, category, model, int(seed))]

    def manifest(self, dataset: str, category: str, model: str, seed: int | str) -> str:
        run = self.run(dataset, category, model, seed)
        return f"{PREPARED_DIR}/{dataset}/{category}/{run.img_size}/manifest.parquet"

    def prepare_config(self, dataset: str) -> dict[str, Any]:
        """The data set entry ``prepare_data`` gets. Synthetic sets are generated there, per category,
        under results/data/<name> (adlib.data.synthetic)."""
        ds = self.datasets[dataset]
        root = f"{DATA_DIR}/{dataset}" if ds["layout"] == SYNTHETIC else ds["root"]
        return {"name": dataset, "layout": ds["layout"], "root": root, "options": dict(ds["options"])}

    def calibration_fraction(self) -> float:
        cal = self.config["calibration"]
        return float(cal["fraction"]) if cal["method"] == "calibration" else 0.0

    def model_name(self, label: str) -> str:
        return self.models[label]["name"]

    def overrides(self, label: str) -> dict[str, Any]:
        """Training overrides of a model, with the run's image size made explicit."""
        model = self.models[label]
        return {**model["overrides"], "img_size": int(model["overrides"].get("img_size", self.config["img_size"]))}

    def produces_maps(self, label: str) -> bool:
        from adlib.models.registry import get_spec

        return bool(getattr(get_spec(self.model_name(label)).cls, "produces_maps", True))

    def model_pattern(self, produces_maps: bool) -> str:
        """Wildcard regex matching the labels of models that do (or do not) produce anomaly maps."""
        import re

        labels = [label for label in self.models if self.produces_maps(label) == produces_maps]
        return "|".join(re.escape(label) for label in labels) if labels else "(?!)"

    def train_fingerprint(self, label: str) -> str:
        return model_fingerprint(self.model_name(label))

    def eval_fingerprint(self, label: str) -> str:
        return f"{model_fingerprint(self.model_name(label))}-{evaluation_fingerprint()}"


def build_run_table(config: Mapping[str, Any]) -> RunTable:
    """All runs (dataset x category x model x seed) of a config returned by :func:`validate_config`."""
    problems, categories = [], {}
    for ds in config["datasets"]:
        try:
            categories[ds["name"]] = resolve_categories(ds)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("invalid data sets:\n  - " + "\n  - ".join(problems))
    return RunTable(config, categories)


# ----------------------------------------------------------------------------------------------
# source fingerprints (Snakemake does not see edits of an installed library)
def _package_root() -> Path:
    import adlib

    return Path(adlib.__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    """Source file of ``module`` (``adlib.*`` resolved on disk without importing it)."""
    if module == "adlib" or module.startswith("adlib."):
        base = _package_root().joinpath(*module.split(".")[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    loaded = sys.modules.get(module)
    path = getattr(loaded, "__file__", None)
    return Path(path) if path else None


@functools.lru_cache(maxsize=None)
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """The ``adlib`` modules a source file imports (at any depth of the file, lazy imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # names may be submodules
    return tuple(sorted(m for m in found if m == "adlib" or m.startswith("adlib.")))


def _package_modules(module: str) -> list[str]:
    """A package stands for every module file inside it."""
    path = _module_file(module)
    if path is None or path.name != "__init__.py":
        return [module]
    return [f"{module}.{'.'.join(p.relative_to(path.parent).with_suffix('').parts)}".removesuffix(".__init__")
            for p in sorted(path.parent.rglob("*.py"))]


def source_files(roots: tuple[str, ...], exclude: frozenset[str] = frozenset(),
                 leaves: tuple[str, ...] = ()) -> dict[str, Path]:
    """Module -> file for ``roots`` and every ``adlib`` module they import, transitively, plus the
    files of ``leaves`` (whose imports are not followed).

    Modules in ``exclude`` (and the ``adlib`` / ``adlib.models`` package files, which import every
    model) are not followed.
    """
    todo = [m for root in roots for m in _package_modules(root)]
    seen: dict[str, Path] = {m: p for m in leaves if (p := _module_file(m)) is not None}
    todo = [m for m in todo if m not in seen]
    while todo:
        module = todo.pop()
        if module in seen or module in exclude or module in _NOT_FOLLOWED:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen[module] = path
        todo.extend(_imports(path, module))
    return seen


def _digest(files: Mapping[str, Path]) -> str:
    digest = hashlib.sha256()
    for module in sorted(files):
        digest.update(module.encode())
        digest.update(hashlib.sha256(files[module].read_bytes()).digest())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def model_fingerprint(name: str) -> str:
    """Hash of the sources that decide how model ``name`` trains and predicts.

    Its own module, every ``adlib`` module that one imports (components, backbones ...), and the
    shared training modules; other model files are excluded, so editing one model file changes
    only that model's fingerprint.
    """
    from adlib.models.registry import get_spec, list_models

    own = get_spec(name).cls.__module__
    others = frozenset(get_spec(n).cls.__module__ for n in list_models()) - {own}
    return _digest(source_files((own, *TRAIN_SHARED_MODULES), exclude=others, leaves=TRAIN_SHARED_FILES))


@functools.lru_cache(maxsize=None)
def evaluation_fingerprint() -> str:
    """Hash of the evaluation sources (metrics, thresholds, plots, the pipeline's evaluate step)."""
    from adlib.models.registry import get_spec, list_models

    models = frozenset(get_spec(n).cls.__module__ for n in list_models())
    return _digest(source_files(EVAL_SHARED_MODULES, exclude=models))


# ----------------------------------------------------------------------------------------------
# script adapters
@contextlib.contextmanager
def job_context(log: str | os.PathLike | None = None, threads: int | None = None) -> Iterator[None]:
    """Run a job's body with stdout/stderr appended to ``log`` and torch limited to ``threads``."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        if "torch" in sys.modules or _torch_importable():
            import torch

            torch.set_num_threads(int(threads))
    if not log:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with open(log, "a", encoding="utf-8", buffering=1) as handle:
        os.dup2(handle.fileno(), 1), os.dup2(handle.fileno(), 2)  # C-level output and subprocesses
        sys.stdout = sys.stderr = handle
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc()
            raise
        finally:
            handle.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1), os.dup2(saved_fds[1], 2)
            os.close(saved_fds[0]), os.close(saved_fds[1])


def _torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run_settings(config: Mapping[str, Any], seed: int | str):
    """The frozen :class:`adlib.Settings` of one job, from a validated config and the run's seed."""
    from adlib.settings import Settings

    return Settings(data_root=config["data_root"], backbone_dir=config["backbone_dir"], output_dir="results",
                    seed=int(seed), num_workers=config["num_workers"], device=config["device"])
