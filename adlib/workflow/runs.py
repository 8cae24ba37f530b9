"""The run table: every (dataset, category, model, seed) run of a validated config, the train
jobs behind them, and the per-run facts rules look up.

A configuration of scope "category" trains one model per category (its train and evaluation
share the run directory). A configuration of scope "dataset" (the multi-class setting) trains
ONE model per data set, in ``.../<dataset>/all/<model>/<seed>``, from the manifests of all its
categories, and is evaluated per category like every other run.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Mapping

from adlib.workflow.config import SYNTHETIC, ConfigError
from adlib.workflow.fingerprints import evaluation_fingerprint, model_fingerprint
from adlib.workflow.paths import Paths

#: the category of a dataset-scope train job (never a real category name, see resolve_categories)
ALL_CATEGORIES = "all"


# ----------------------------------------------------------------------------------------------
# categories
def resolve_categories(dataset: Mapping[str, Any]) -> list[str]:
    """The categories of one validated data set entry; "all" is looked up under its root."""
    categories = dataset.get("categories", "all")
    if dataset["layout"] == SYNTHETIC:
        found = list(categories)
    else:
        available = available_categories(dataset)
        if categories == "all":
            if not available:
                raise ConfigError(f"data set {dataset['name']!r}: no categories found under {dataset['root']} "
                                  f"(layout {dataset['layout']}); check 'root' or list the categories explicitly")
            found = available
        else:
            missing = [c for c in categories if available is not None and c not in available]
            if missing:
                raise ConfigError(f"data set {dataset['name']!r}: unknown categories {missing} under "
                                  f"{dataset['root']}; available categories: {', '.join(available) or '(none)'}")
            found = list(categories)
    if ALL_CATEGORIES in found:
        raise ConfigError(f"data set {dataset['name']!r}: a category named {ALL_CATEGORIES!r} clashes with the "
                          "workflow's name for runs over all categories; rename that folder")
    return found


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
# runs
@dataclasses.dataclass(frozen=True)
class Run:
    """One evaluated run: a model (by label) on one category of one data set with one seed."""

    dataset: str
    category: str
    model: str
    seed: int
    img_size: int
    scope: str
    paths: Paths = Paths()

    @property
    def run_dir(self) -> str:
        """Where the run's evaluation (and, for scope "category", its training) is written."""
        return self.paths.run(self.dataset, self.category, self.model, self.seed)

    @property
    def train_category(self) -> str:
        return ALL_CATEGORIES if self.scope == "dataset" else self.category

    @property
    def train_dir(self) -> str:
        """Where the model of this run is trained (shared by all categories for scope "dataset")."""
        return self.paths.run(self.dataset, self.train_category, self.model, self.seed)


class RunTable:
    """Every run of a validated config, with the per-dataset and per-model facts rules look up."""

    def __init__(self, config: Mapping[str, Any], categories: Mapping[str, list[str]]):
        self.config = config
        self.paths = Paths(config.get("results", "results"))
        self.datasets = {ds["name"]: ds for ds in config["datasets"]}
        self.models = {m["label"]: m for m in config["models"]}
        self.categories = dict(categories)
        self.runs: list[Run] = []
        for ds in config["datasets"]:
            for category in self.categories[ds["name"]]:
                for label in self.models:
                    for seed in config["seeds"]:
                        self.runs.append(Run(ds["name"], category, label, int(seed), self.img_size(label),
                                             self.scope(label), self.paths))
        self._by_key = {(r.dataset, r.category, r.model, r.seed): r for r in self.runs}
        self._by_train = {}
        for run in self.runs:
            self._by_train.setdefault((run.dataset, run.train_category, run.model, run.seed), []).append(run)

    def __len__(self) -> int:
        return len(self.runs)

    # -- lists for rule "all" and the aggregates
    def run_dirs(self) -> list[str]:
        return [r.run_dir for r in self.runs]

    def run_files(self, name: str) -> list[str]:
        """A file every evaluation writes (metrics.json, scores.parquet), one per run."""
        return [f"{r.run_dir}/{name}" for r in self.runs]

    def map_files(self) -> list[str]:
        """maps.npz of every run whose model produces anomaly maps."""
        return [f"{r.run_dir}/maps.npz" for r in self.runs if self.produces_maps(r.model)]

    def category_manifests(self) -> list[str]:
        """One prepared manifest per data set x category (the masks of the ensemble's fused maps)."""
        first = {}
        for run in self.runs:
            first.setdefault((run.dataset, run.category), self.manifest_path(run.dataset, run.category, run.img_size))
        return list(first.values())

    def train_files(self, name: str) -> list[str]:
        """A file every training writes (config.json, fit.json ...), one per train job."""
        return list(dict.fromkeys(f"{r.train_dir}/{name}" for r in self.runs))

    # -- per-wildcard look-ups
    def run(self, dataset: str, category: str, model: str, seed: int | str) -> Run:
        return self._by_key[(dataset, category, model, int(seed))]

    def trained_runs(self, dataset: str, category: str, model: str, seed: int | str) -> list[Run]:
        """The runs a train job serves (one, or every category for scope "dataset")."""
        return self._by_train[(dataset, category, model, int(seed))]

    def manifest_path(self, dataset: str, category: str, size: int) -> str:
        return self.paths.manifest.format(dataset=dataset, key=self.prepare_key(dataset), category=category, size=size)

    @functools.lru_cache(maxsize=None)
    def prepare_key(self, dataset: str) -> str:
        """12 hex digits over everything that decides a data set's prepared manifests."""
        import hashlib
        import json
        import os

        cfg = self.prepare_config(dataset)
        facts = {**cfg, "root": os.path.abspath(cfg["root"]), "calibration_fraction": self.calibration_fraction(),
                 "data_seed": self.config["data_seed"]}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @functools.lru_cache(maxsize=None)
    def data_fingerprint(self, dataset: str, category: str) -> str:
        """Fingerprint of the category's files on disk (a prepare param: changed data reprepares)."""
        from adlib.data.fingerprint import data_fingerprint

        ds = self.datasets[dataset]
        return data_fingerprint(ds["layout"], ds.get("root", ""), category)

    def manifest(self, dataset: str, category: str, model: str, seed: int | str) -> str:
        """The prepared manifest an evaluation reads."""
        run = self.run(dataset, category, model, seed)
        return self.manifest_path(dataset, category, run.img_size)

    def train_manifests(self, dataset: str, category: str, model: str, seed: int | str) -> list[str]:
        """The prepared manifests a train job reads (all categories for scope "dataset")."""
        return [self.manifest_path(r.dataset, r.category, r.img_size)
                for r in self.trained_runs(dataset, category, model, seed)]

    def model_file(self, dataset: str, category: str, model: str, seed: int | str, name: str) -> str:
        """A file of the trained model an evaluation uses (in the run's train directory)."""
        return f"{self.run(dataset, category, model, seed).train_dir}/{name}"

    def prepare_config(self, dataset: str) -> dict[str, Any]:
        """The data set entry ``prepare_data`` gets. Synthetic sets are generated there, per category,
        under <results>/data/<name> (adlib.data.synthetic)."""
        ds = self.datasets[dataset]
        root = f"{self.paths.data}/{dataset}" if ds["layout"] == SYNTHETIC else ds["root"]
        return {"name": dataset, "layout": ds["layout"], "root": root, "options": dict(ds["options"])}

    def calibration_fraction(self) -> float:
        cal = self.config["calibration"]
        return float(cal["fraction"]) if cal["method"] == "calibration" else 0.0

    def model_name(self, label: str) -> str:
        return self.models[label]["name"]

    def spec(self, label: str):
        from adlib.models.registry import get_spec

        return get_spec(self.model_name(label))

    def scope(self, label: str) -> str:
        return self.spec(label).scope

    def img_size(self, label: str) -> int:
        """A model's image size: its override, else the config's ``img_size`` when set, else the
        size its configuration is registered with."""
        overrides = self.models[label]["overrides"]
        if "img_size" in overrides:
            return int(overrides["img_size"])
        if self.config.get("img_size") is not None:
            return int(self.config["img_size"])
        return _registered_size(self.model_name(label))

    def overrides(self, label: str) -> dict[str, Any]:
        """Training overrides of a model, with the run's image size made explicit."""
        return {**self.models[label]["overrides"], "img_size": self.img_size(label)}

    def produces_maps(self, label: str) -> bool:
        return bool(self.spec(label).cls.produces_maps)

    def model_pattern(self, produces_maps: bool) -> str:
        """Wildcard regex matching the labels of models that do (or do not) produce anomaly maps."""
        labels = [label for label in self.models if self.produces_maps(label) == produces_maps]
        return "|".join(re.escape(label) for label in labels) if labels else "(?!)"

    def train_fingerprint(self, label: str) -> str:
        return model_fingerprint(self.model_name(label))

    def eval_fingerprint(self, label: str) -> str:
        return f"{model_fingerprint(self.model_name(label))}-{evaluation_fingerprint()}"


@functools.lru_cache(maxsize=None)
def _registered_size(name: str) -> int:
    from adlib.models.registry import resolve_config

    return int(resolve_config(name).train["img_size"])


def build_run_table(config: Mapping[str, Any]) -> RunTable:
    """All runs (dataset x category x model x seed) of a config returned by ``validate_config``."""
    categories, problems = _categories(config)
    if problems:
        raise ConfigError(problems)
    return RunTable(config, categories)


def _categories(config: Mapping[str, Any]) -> tuple[dict[str, list[str]], list[str]]:
    problems, categories = [], {}
    for ds in config["datasets"]:
        try:
            categories[ds["name"]] = resolve_categories(ds)
        except ConfigError as err:
            problems += err.problems
    return categories, problems


def load_workflow(config: Mapping[str, Any], schema) -> tuple[dict[str, Any], RunTable]:
    """What the Snakefile needs: the validated config and its run table. Every problem (schema,
    models and their overrides, data sets and their categories, missing weights and auxiliary
    folders) is reported at once in one :class:`ConfigError`."""
    from adlib.workflow.config import check_requirements, validated

    cfg, problems = validated(config, schema)
    if problems:
        if isinstance(cfg.get("datasets"), list) and all(isinstance(d, dict) and "layout" in d and "name" in d
                                                          for d in cfg["datasets"]):
            problems += _categories(cfg)[1]
        raise ConfigError(problems)
    categories, problems = _categories(cfg)
    problems += check_requirements(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg, RunTable(cfg, categories)
