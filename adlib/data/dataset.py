"""One torch Dataset over a manifest, decoding files or reading the image cache."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from adlib.data.cache import ImageCache
from adlib.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageSize, KeepAspect, load_sample, output_shape
from adlib.data.manifest import load_manifest, validate_manifest

Normalize = bool | tuple[Sequence[float], Sequence[float]]


class ImageDataset(Dataset):
    """Samples of a manifest as dicts that torch's default collate batches.

    Each item: ``image`` float32 ``3 x S x S`` in [0, 1] (or normalised), ``mask`` float32
    ``1 x S x S`` in {0, 1} (zeros without a mask), ``label`` int, ``path`` str, ``index`` int
    (row of the manifest). ``S`` is ``center_crop`` or ``img_size``; with a
    :class:`~adlib.data.images.KeepAspect` ``img_size`` items are ``H x W``, each image's own.

    ``normalize``: False (default; models normalise their own input), True (ImageNet mean/std)
    or ``(mean, std)``. ``cache``: an :class:`ImageCache` of the same size, or a cache root folder
    (the cache is then built or reused there).
    """

    def __init__(self, manifest: pd.DataFrame | str | os.PathLike, img_size: ImageSize,
                 center_crop: int | None = None, normalize: Normalize = False,
                 cache: ImageCache | str | os.PathLike | None = None) -> None:
        if not isinstance(manifest, pd.DataFrame):
            manifest = load_manifest(manifest)
        self.manifest = validate_manifest(manifest).reset_index(drop=True)
        self.img_size = img_size if isinstance(img_size, KeepAspect) else int(img_size)
        self.center_crop = None if center_crop is None else int(center_crop)
        if cache is not None and not isinstance(cache, ImageCache):
            cache = ImageCache.build(self.manifest, cache, self.img_size, self.center_crop)
        if cache is not None and (cache.img_size, cache.center_crop) != (self.img_size, self.center_crop):
            raise ValueError(f"the image cache holds img_size={cache.img_size}, center_crop={cache.center_crop} "
                             f"but the dataset wants img_size={self.img_size}, center_crop={self.center_crop}")
        self.cache = cache
        self._paths = self.manifest["image_path"].astype(str).tolist()
        self._masks = self.manifest["mask_path"].astype(str).tolist()
        self._labels = self.manifest["label"].astype(int).tolist()
        self._stats = _normalization(normalize)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        return self.item(index, *self.raw(index))

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image (``H x W x 3``) and mask (``H x W``) of one row, read-only when cached."""
        path = self._paths[index]
        if self.cache is not None:
            return self.cache.get(path)
        return load_sample(path, self._masks[index], self.img_size, self.center_crop)

    def shape(self, index: int) -> tuple[int, int]:
        """(height, width) of one row's sample, without decoding it."""
        if self.cache is not None:
            return self.cache.shape(self._paths[index])
        return output_shape(self._paths[index], self.img_size, self.center_crop)

    def item(self, index: int, pixels: np.ndarray, mask: np.ndarray, label: int | None = None) -> dict:
        """The item of row ``index`` made of ``pixels`` and ``mask`` (the row's, or a part of them)."""
        # numpy, not torch: per-sample torch ops spawn intra-op threads that crawl on busy CPUs
        image = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
        np.divide(image, 255.0, out=image)
        if self._stats is not None:
            image = (image - self._stats[0]) / self._stats[1]
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(np.array(mask, dtype=np.float32)[None]),
                "label": self._labels[index] if label is None else label, "path": self._paths[index],
                "index": index}


def _normalization(normalize: Normalize) -> tuple[np.ndarray, np.ndarray] | None:
    if normalize is False or normalize is None:
        return None
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize is True else normalize
    return (np.asarray(mean, dtype=np.float32).reshape(3, 1, 1), np.asarray(std, dtype=np.float32).reshape(3, 1, 1))
