"""Notebook-friendly entry points with the original specification's semantics: ``train`` and
``train_models``.

    from adlib import Settings, train
    settings = Settings(data_root="/data", backbone_dir="/weights", output_dir="outputs")
    train("mvtec", "bottle", "stfpm", settings=settings, num_epochs=50)
    train("tiles", "magnetic_tile", "padim", layout="mvtec", root="/data/shared")  # any folder, any name

Outputs go to ``<output_dir>/<dataset>/<category>/<model>/`` (the original specification's
layout); the manifest and decoded-image cache of a category are shared by every model trained on
it. Everything that can be checked (options, device, data, splits, an existing run in the way)
is checked before any training starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from adlib.io import read_json
from adlib.run import evaluate_run, prepare_data, train_run
from adlib.settings import Settings

log = logging.getLogger(__name__)

#: data set names with a known layout (what the name alone means without ``layout``)
KNOWN_DATASETS = {"mvtec": "mvtec", "mvtec_ad": "mvtec", "visa": "visa", "btad": "btad"}
#: directory names tried under the data root for each known data set
_DATASET_DIRS = {"mvtec": ("mvtec", "MVTec", "mvtec_ad", "mvtec_anomaly_detection"),
                 "visa": ("visa", "VisA", "visa_pytorch"), "btad": ("btad", "BTAD", "BTech_Dataset_transformed")}
_CHOOSE = ("name the layout and the folder explicitly: layout=... and root=... (CLI: --layout LAYOUT "
           "--root PATH); layouts: mvtec, visa, btad, custom, folder")


class RunExistsError(ValueError):
    """Another run (other options or seed) is in the output folder; replacing it needs overwrite."""


def dataset_config(name: str, settings: Settings, layout: str | None = None,
                   root: str | Path | None = None) -> dict[str, Any]:
    """Where data set ``name`` lives, and in which layout.

    With ``root`` the data set is there (``layout`` given, or detected from the folder); without
    it a known name (mvtec, visa, btad) is looked up under the data root, and any other name is
    a custom-format data set ``<data_root>/<name>/data_rgb``.
    """
    from adlib.data import DataError, detect_layout

    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"data set root {root} does not exist or is not a folder; {_CHOOSE}")
        return {"name": name, "layout": layout or detect_layout(root), "root": str(root), "options": {}}
    known = layout or KNOWN_DATASETS.get(name.lower())
    if known in _DATASET_DIRS:
        for candidate in (name, *_DATASET_DIRS[known]):
            if (settings.data_root / candidate).is_dir():
                return {"name": name, "layout": known, "root": str(settings.data_root / candidate), "options": {}}
        tried = ", ".join(str(settings.data_root / c) for c in dict.fromkeys((name, *_DATASET_DIRS[known])))
        raise DataError(f"data set {name!r} not found: assumed layout {known!r} and looked for {tried}. Put it "
                        f"there, set the data root (data_root / --data-root / ADLIB_DATA_ROOT), or {_CHOOSE}")
    if known in (None, "custom"):
        return {"name": name, "layout": "custom", "root": str(settings.data_root), "options": {}}
    return {"name": name, "layout": known, "root": str(settings.data_root / name), "options": {}}


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _categories(cfg: dict, categories: str | Sequence[str]) -> list[str]:
    from adlib.data import list_categories

    if categories == "all":
        return list_categories(cfg["layout"], cfg["root"], dataset=cfg["name"])
    return _as_list(categories)


def check_options(model: str, overrides: dict[str, Any]) -> None:
    """Refuse a configuration with any problem (types, ranges, what the model refuses), all at once."""
    from adlib.models.checks import check_config

    problems = check_config(model, overrides)
    if problems:
        raise ValueError(f"invalid options for {model}:\n  - " + "\n  - ".join(map(str, problems)))


def _check_splits(manifest_path: Path, calibration: str, calibration_fraction: float) -> None:
    """A test split to evaluate, and the calibration split that was asked for, before training."""
    from adlib.data import DataError, load_manifest

    manifest = load_manifest(manifest_path)
    if not (manifest["split"] == "test").any():
        raise DataError(f"{manifest_path}: the data set has no test images, so a trained model could not be "
                        "evaluated; add test images (normal and anomalous) before training")
    if calibration == "calibration" and not (manifest["split"] == "calibration").any():
        raise DataError(f"{manifest_path}: calibration_fraction={calibration_fraction} moved no image to the "
                        "calibration split (each class needs at least 2 test images, one always stays in test); "
                        "add test images or use calibration='test'")


def _guard_existing(run_dir: Path, expected: dict, overwrite: bool) -> None:
    """Refuse to replace a run trained with other options or another seed, unless ``overwrite``."""
    from adlib import artifacts

    path = run_dir / artifacts.CONFIG
    if overwrite or not path.is_file():
        return
    existing = read_json(path)
    if artifacts.config_hash(existing) == artifacts.config_hash(expected):
        return  # the same run again
    changed = [key for key in ("seed", "pretrained") if existing.get(key) != expected.get(key)]
    for section in ("model", "train"):
        old, new = existing.get(section, {}), expected.get(section, {})
        changed += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
    raise RunExistsError(f"{run_dir} holds a run of {existing.get('name')} with other settings "
                         f"({'; '.join(changed) or 'another configuration'}); pass overwrite=True (CLI --overwrite) "
                         "to replace it, or write this run to another output folder (output_dir / --output-dir)")


def train(dataset: str | Sequence[str], category: str | Sequence[str], model: str, *,
          settings: Settings | None = None, layout: str | None = None, root: str | Path | None = None,
          pretrained: bool = True, calibration: str = "test", calibration_fraction: float = 0.0,
          overwrite: bool = False, progress: bool = True, **overrides: Any) -> list[dict]:
    """Train and evaluate ``model`` on every (data set, category); return their metrics.

    ``dataset`` and ``category`` take one name, a list, or ``"all"`` for every category; a run is
    labelled by its data set's name. ``layout`` and ``root`` say how and where a data set is
    stored (see :func:`dataset_config`). Each (data set, category) gets its own model, except for
    configurations of scope "dataset" (the multi-class setting): they train ONE model on all the
    given categories of a data set (in ``<output>/<dataset>/all/<model>``) and are evaluated per
    category. ``overrides`` are registry options (``num_epochs``, ``batch_size``, ``img_size``,
    ``normalize``, ``backbone``, ...). A different run already in the output folder is replaced
    only with ``overwrite=True``.
    """
    from adlib import artifacts
    from adlib.models.registry import get_spec, resolve_config
    from adlib.training import resolve_device

    settings = settings or Settings.load()
    check_options(model, overrides)
    resolve_device(settings.device)  # a device that does not exist fails now, not after preparing data
    if calibration not in ("test", "calibration"):
        raise ValueError(f"calibration must be 'test' or 'calibration', got {calibration!r}")
    if calibration == "calibration" and not 0 < calibration_fraction < 1:
        raise ValueError("calibration='calibration' fits thresholds on a held-out calibration split: give "
                         f"calibration_fraction in (0, 1) (CLI --calibration-fraction), got {calibration_fraction}")
    config = resolve_config(model, **overrides)
    img_size = config.train["img_size"]
    shared = get_spec(model).scope == "dataset"
    results = []
    for name in _as_list(dataset):
        cfg = dataset_config(name, settings, layout=layout, root=root)
        manifests = {}
        for cat in _categories(cfg, category):
            manifests[cat] = prepare_data(cfg, cat, img_size, settings.output_dir / name / cat / "manifest.parquet",
                                          settings.resolved_cache_dir, calibration_fraction=calibration_fraction,
                                          seed=settings.seed)
            _check_splits(manifests[cat], calibration, calibration_fraction)
        groups = {"all": list(manifests)} if shared else {cat: [cat] for cat in manifests}
        for train_name, cats in groups.items():
            model_dir = settings.output_dir / name / train_name / model
            _guard_existing(model_dir, artifacts.run_config(config, dataset=name, category=train_name, categories=cats,
                                                            seed=settings.seed, pretrained=pretrained), overwrite)
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
