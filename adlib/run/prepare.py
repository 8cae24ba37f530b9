"""Prepare: index one category of a data set into a manifest and build its decoded-image cache."""
from __future__ import annotations

from pathlib import Path


def prepare_data(dataset_cfg: dict, category: str, img_size: int, manifest_out: str | Path,
                 cache_root: str | Path, *, calibration_fraction: float = 0.0, seed: int = 0) -> Path:
    """Index ``category`` of the data set described by ``dataset_cfg`` (``name``, ``layout``,
    ``root``, ``options``), cache its images at ``img_size`` and write the manifest."""
    from adlib.data import DataError, ImageCache, index_dataset, save_manifest

    options = dict(dataset_cfg.get("options") or {})
    seed = options.pop("seed", seed)  # a layout's own seed option (synthetic, custom split) wins
    layout, root = dataset_cfg["layout"], dataset_cfg["root"]
    try:
        manifest = index_dataset(layout, root, category, dataset=dataset_cfg["name"],
                                 calibration_fraction=calibration_fraction, seed=seed, **options)
    except DataError as err:
        raise DataError(f"{err} [data set {dataset_cfg['name']!r} read as layout {layout!r} from {root}; if that "
                        "is not how it is stored, name the layout (workflow: datasets[].layout; CLI: --layout "
                        "with --root)]") from None
    ImageCache.build(manifest, Path(cache_root), img_size)
    save_manifest(manifest, Path(manifest_out))
    return Path(manifest_out)
