"""Notebook-friendly entry points with the original specification's semantics: ``train`` and ``train_models``.

    from adlib import Settings, train
    settings = Settings(data_root="/data", backbone_dir="/weights", output_dir="outputs")
    train("mvtec", "bottle", "stfpm", settings=settings, num_epochs=50)

Outputs go to ``<output_dir>/<dataset>/<category>/<model>/`` (the original specification's layout); the manifest
and decoded-image cache of a category are shared by every model trained on it.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import pandas as pd

from adlib.io import read_json
from adlib.run import evaluate_run, prepare_data, train_run
from adlib.settings import Settings

log = logging.getLogger(__name__)

#: data set names with a known layout; any other name is a custom (original-specification format) data set
KNOWN_DATASETS = {"mvtec": "mvtec", "mvtec_ad": "mvtec", "visa": "visa", "btad": "btad"}
#: directory names tried under the data root for each known data set
_DATASET_DIRS = {"mvtec": ("mvtec", "MVTec", "mvtec_ad", "mvtec_anomaly_detection"),
                 "visa": ("visa", "VisA", "visa_pytorch"), "btad": ("btad", "BTAD", "BTech_Dataset_transformed")}


def dataset_config(name: str, settings: Settings) -> dict[str, Any]:
    """Where data set ``name`` lives under the settings' data root, and in which layout."""
    layout = KNOWN_DATASETS.get(name.lower())
    if layout is None:
        return {"name": name, "layout": "custom", "root": str(settings.data_root), "options": {}}
    for candidate in _DATASET_DIRS[layout]:
        if (settings.data_root / candidate).is_dir():
            return {"name": name, "layout": layout, "root": str(settings.data_root / candidate), "options": {}}
    tried = ", ".join(str(settings.data_root / c) for c in _DATASET_DIRS[layout])
    raise FileNotFoundError(f"data set {name!r} not found: looked for {tried}. Put it there or set "
                            "Settings(data_root=...) / ADLIB_DATA_ROOT")


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _categories(cfg: dict, categories: str | Sequence[str]) -> list[str]:
    from adlib.data import list_categories

    if categories == "all":
        return list_categories(cfg["layout"], cfg["root"], dataset=cfg["name"])
    return _as_list(categories)


def train(dataset: str | Sequence[str], category: str | Sequence[str], model: str, *,
          settings: Settings | None = None, pretrained: bool = True, calibration: str = "test",
          calibration_fraction: float = 0.0, progress: bool = True, **overrides: Any) -> list[dict]:
    """Train and evaluate ``model`` on every (data set, category); return their metrics.

    ``dataset`` and ``category`` take one name, a list, or ``"all"`` for every category. Each
    (data set, category) gets its own model, as in the original specification, except for
    configurations of scope "dataset" (the multi-class setting): they train ONE model on all
    the given categories of a data set (in ``<output>/<dataset>/all/<model>``) and are evaluated
    per category. ``overrides`` are registry options (``num_epochs``, ``batch_size``,
    ``img_size``, ``normalize``, ``backbone``, ...).
    """
    from adlib.models.registry import get_spec, resolve_config

    settings = settings or Settings.load()
    img_size = resolve_config(model, **overrides).train["img_size"]  # fails early on bad options
    shared = get_spec(model).scope == "dataset"
    results = []
    for name in _as_list(dataset):
        cfg = dataset_config(name, settings)
        manifests = {}
        for cat in _categories(cfg, category):
            manifests[cat] = prepare_data(cfg, cat, img_size, settings.output_dir / name / cat / "manifest.parquet",
                                          settings.resolved_cache_dir, calibration_fraction=calibration_fraction,
                                          seed=settings.seed)
        groups = {"all": list(manifests)} if shared else {cat: [cat] for cat in manifests}
        for train_name, cats in groups.items():
            model_dir = settings.output_dir / name / train_name / model
            train_run([manifests[c] for c in cats], model, overrides, model_dir, settings,
                      cache_root=settings.resolved_cache_dir, pretrained=pretrained, progress=progress)
            for cat in cats:
                run_dir = settings.output_dir / name / cat / model
                evaluate_run(run_dir, manifests[cat], settings, cache_root=settings.resolved_cache_dir,
                             calibration=calibration, progress=progress, model_dir=model_dir)
                metrics = read_json(run_dir / "metrics.json")
                results.append({"dataset": name, "category": cat, "model": model, "run_dir": str(run_dir),
                                **metrics})
                log.info("%s/%s/%s: image AUROC %s", name, cat, model, metrics.get("image_auroc"))
    return results


def train_models(dataset_type: str | Sequence[str], categories: str | Sequence[str], models: Sequence[str], *,
                 settings: Settings | None = None, **kwargs: Any) -> pd.DataFrame:
    """Train every model of ``models`` on every category in turn; return one row per run."""
    rows = []
    for model in _as_list(models):
        rows.extend(train(dataset_type, categories, model, settings=settings, **kwargs))
    columns = ["dataset", "category", "model", "image_auroc", "image_aupr", "image_f1_max", "pixel_auroc",
               "pixel_aupro", "inference_ms_b1", "run_dir"]
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame.columns]]
