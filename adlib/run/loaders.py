"""Data loaders of a run: manifest images (through the decode cache) and auxiliary streams."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from torch.utils.data import DataLoader

from adlib.models.base import AnomalyModel
from adlib.settings import Settings


def split_of(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    return manifest[manifest["split"] == split].reset_index(drop=True)


def image_loader(manifest: pd.DataFrame, train_cfg: dict, cache_root: str | Path | None, settings: Settings, *,
                 shuffle: bool, batch_size: int | None = None, drop_last: bool = False,
                 training: bool = False) -> DataLoader:
    """The images of ``manifest`` at the configuration's size (and crop), seeded shuffling.

    A tiled configuration (docs/tiling.md) keeps the images at their aspect ratio: a
    ``training`` loader yields their tiles, any other loader whole images one at a time (their
    sizes may differ; the tiled model batches their tiles).
    """
    from adlib.data import ImageCache, ImageDataset
    from adlib.tiling import TileDataset, Tiling, image_geometry

    size, crop = image_geometry(train_cfg)
    cache = ImageCache.build(manifest, Path(cache_root), size, center_crop=crop) if cache_root is not None else None
    dataset = ImageDataset(manifest, size, center_crop=crop, normalize=False, cache=cache)
    tiling = Tiling.of(train_cfg)
    if tiling is not None and training:
        dataset = TileDataset(dataset, tiling, seed=settings.seed)
    elif tiling is not None:
        batch_size = 1
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(dataset, batch_size=batch_size or int(train_cfg["batch_size"]), shuffle=shuffle,
                      drop_last=drop_last, num_workers=settings.num_workers, generator=generator,
                      pin_memory=False, persistent_workers=False)


#: images per scoring batch on the CPU. Scoring treats images independently, so the batch only
#: sets how much is alive at once and how often per-batch work (PaDiM's inverse covariances,
#: PatchCore's bank) is read: at 16 instead of 32, PaDiM's and PatchCore's scoring peaks are
#: 80-200 MiB lower and no slower; 8 is lower still but 10-25% slower (docs/benchmarks.md, "Memory")
CPU_SCORING_BATCH = 16


def scoring_batch_size(train_cfg: dict, settings: Settings, device: torch.device) -> int:
    """Images per scoring batch: ``settings.scoring_batch_size`` when set, else the
    configuration's batch size, capped at :data:`CPU_SCORING_BATCH` on the CPU."""
    if settings.scoring_batch_size:
        return int(settings.scoring_batch_size)
    configured = int(train_cfg["batch_size"])
    return min(configured, CPU_SCORING_BATCH) if device.type == "cpu" else configured


def scoring_loader(manifest: pd.DataFrame, train_cfg: dict, cache_root: str | Path | None, settings: Settings,
                   device: torch.device) -> DataLoader:
    """The images of ``manifest`` in order, in batches of :func:`scoring_batch_size`."""
    return image_loader(manifest, train_cfg, cache_root, settings, shuffle=False,
                        batch_size=scoring_batch_size(train_cfg, settings, device))


def auxiliary_streams(model: AnomalyModel, train_cfg: dict, settings: Settings
                      ) -> tuple[dict[str, Iterator[torch.Tensor]], dict[str, str]]:
    """Endless batch iterators of the model's declared auxiliary streams, and where each came
    from (``"folder:<path>"``) or which documented fallback replaces it (``"fallback:<name>"``).

    A missing folder without a fallback is a :class:`~adlib.data.DataError` that names the
    folders looked in and what to put there; it is raised before any training.
    """
    from adlib.data import DataError
    from adlib.data.auxiliary import AuxiliaryImages, endless_batches, resolve_aux_source

    streams, sources = {}, {}
    for stream in model.auxiliary_streams():
        try:
            folder = resolve_aux_source(stream.source, settings.data_root)
        except DataError as err:
            if stream.fallback is None:
                raise DataError(f"{type(model).__name__} trains with auxiliary {stream.source!r} images (stream "
                                f"{stream.name!r}), looked for under the data root {settings.data_root}: {err}"
                                ) from None
            sources[stream.name] = f"fallback:{stream.fallback}"
            continue
        images = AuxiliaryImages(folder, stream.size or int(train_cfg["img_size"]))
        batch = stream.batch_size or int(train_cfg["batch_size"])
        streams[stream.name] = endless_batches(images, batch, seed=settings.seed, num_workers=settings.num_workers)
        sources[stream.name] = f"folder:{folder}"
    return streams, sources
