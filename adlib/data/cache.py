"""Decode once: an on-disk cache of decoded, resized uint8 images, read row by row.

One shard per (dataset, category, image size[, crop]) of a manifest:

    <cache_root>/<dataset>/<category>/<S>px[-crop<C>]/<key hash>/
        images.npy   N x S x S x 3 uint8       masks.npy   N x S x S uint8 (0/1)
        key.json     format, img_size, center_crop, [image, size, mtime_ns, mask, size, mtime_ns] rows

Images kept at their aspect ratio (a :class:`~adlib.data.images.KeepAspect` size: tiled runs)
differ in size, so their shard (folder ``full``, ``long<L>`` or ``<H>x<W>``) stores them one
after the other: ``images.npy`` (all pixels, flat), ``masks.npy`` (flat) and ``shapes.npy``
(N x 2: height, width).

The key covers every source file's path, size and modification time: a shard is reused when it
holds every image of the manifest unchanged (so the shard of a whole category also serves its
train-only subset), and a new one is built when a file changed or was added, or for another
image size. A shard is built in a temporary
folder and renamed into place under a file lock: readers never see a half-written shard, and
two processes racing build it once. Older shards of the same size are removed after a rebuild.

A damaged shard is never trusted: key.json records each array file's size and CRC-32, checked
when a process first uses the shard (sizes always, contents once per process, about 0.1 s per
GB); a shard that fails is rebuilt with a warning. The space a shard needs is reserved before
decoding starts, so a full disk is an ordinary error naming the folder and the space needed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from adlib.data.files import check_name
from adlib.data.images import ImageSize, KeepAspect, load_sample, output_shape
from adlib.data.manifest import DataError, DataWarning, validate_manifest
from adlib.io import dir_mode, remove_stale_temporaries, temporary_name

log = logging.getLogger(__name__)
CACHE_FORMAT = 2
#: shards whose contents this process has checked (directory -> key.json mtime)
_VERIFIED: dict[str, int] = {}


class NpyRows:
    """Rows of a C-ordered ``.npy`` array read one at a time by positioned reads.

    Unlike a memory map, what has been read does not stay mapped into the process: the pages
    live in the operating system's file cache, not in this process's resident memory (a memory
    map adds every image a job reads to its RSS).
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed with the object)
        version = np.lib.format.read_magic(self._file)
        header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in header:
            raise DataError(f"{path} has .npy format version {version}; rebuild the image cache")
        shape, fortran, dtype = header[version](self._file)
        if fortran:
            raise DataError(f"{path} is stored in Fortran order; rebuild the image cache")
        self.shape, self.dtype, self._offset = tuple(shape), np.dtype(dtype), self._file.tell()
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, row: int) -> np.ndarray:
        """Read-only row ``row``."""
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"row {row} outside 0..{self.shape[0] - 1}")
        return self.span(row, row + 1)[0]

    def span(self, start: int, stop: int) -> np.ndarray:
        """Read-only rows ``start:stop`` in one read (a ragged shard's image is a span of its flat array)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows {start}:{stop} outside 0..{self.shape[0]}")
        size = (stop - start) * self._row_bytes
        data = os.pread(self._file.fileno(), size, self._offset + start * self._row_bytes)
        if len(data) != size:
            raise DataError(f"{self._file.name} is truncated; rebuild the image cache")
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


class CacheShard:
    """The cached images of one (dataset, category, size); files open lazily (per process)."""

    def __init__(self, directory: Path, paths: list[str]) -> None:
        self.directory = directory
        self.paths = paths
        self._arrays: tuple[NpyRows, NpyRows] | None = None
        self._shapes: np.ndarray | None = None  # ragged shards: (height, width) per row
        self._offsets: np.ndarray | None = None  # ragged shards: first pixel of each row

    def arrays(self) -> tuple[NpyRows, NpyRows]:
        if self._arrays is None:
            self._arrays = (NpyRows(self.directory / "images.npy"), NpyRows(self.directory / "masks.npy"))
            if (self.directory / "shapes.npy").is_file():
                self._shapes = np.load(self.directory / "shapes.npy")
                self._offsets = np.concatenate([[0], np.cumsum(self._shapes.prod(axis=1))])
        return self._arrays

    def sample(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Read-only image (``H x W x 3``) and mask (``H x W``) of one row."""
        images, masks = self.arrays()
        if self._shapes is None:
            return images[row], masks[row]
        (h, w), start = self._shapes[row], int(self._offsets[row])
        return (images.span(3 * start, 3 * (start + h * w)).reshape(h, w, 3),
                masks.span(start, start + h * w).reshape(h, w))

    def shape(self, row: int) -> tuple[int, int]:
        """(height, width) of one row."""
        images, _ = self.arrays()
        return tuple(int(v) for v in (images.shape[1:3] if self._shapes is None else self._shapes[row]))

    def __getstate__(self) -> dict:  # DataLoader workers re-open the files themselves
        return {**self.__dict__, "_arrays": None, "_shapes": None, "_offsets": None}


class ImageCache:
    """Decoded images (read row by row from disk) for the rows of a manifest; build it with :meth:`build`."""

    def __init__(self, shards: list[CacheShard], img_size: ImageSize, center_crop: int | None,
                 built: int = 0) -> None:
        self.shards = shards
        self.img_size = img_size
        self.center_crop = center_crop
        self.built = built  # how many shards this build() call decoded (0: all reused)
        self._where = {path: (s, row) for s, shard in enumerate(shards) for row, path in enumerate(shard.paths)}

    @property
    def size(self) -> ImageSize:
        """Side of the cached images: ``center_crop`` or ``img_size`` (a :class:`KeepAspect` size
        for images kept at their aspect ratio)."""
        return self.center_crop or self.img_size

    @property
    def directories(self) -> list[Path]:
        return [shard.directory for shard in self.shards]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_path: object) -> bool:
        return image_path in self._where

    def get(self, image_path: str) -> tuple[np.ndarray, np.ndarray]:
        """Read-only ``S x S x 3`` image and ``S x S`` mask (0/1) of one image path (``H x W``
        for a :class:`KeepAspect` size)."""
        s, row = self._locate(image_path)
        return self.shards[s].sample(row)

    def shape(self, image_path: str) -> tuple[int, int]:
        """(height, width) of one cached image, without reading its pixels."""
        s, row = self._locate(image_path)
        return self.shards[s].shape(row)

    def _locate(self, image_path: str) -> tuple[int, int]:
        try:
            return self._where[image_path]
        except KeyError:
            raise DataError(f"{image_path} is not in the image cache; rebuild it with "
                            "ImageCache.build for this manifest") from None

    @classmethod
    def build(cls, manifest: pd.DataFrame, cache_root: str | os.PathLike, img_size: ImageSize,
              center_crop: int | None = None, workers: int | None = None) -> "ImageCache":
        """Reuse the shards whose key matches the manifest's files; decode the others."""
        validate_manifest(manifest)
        if isinstance(img_size, KeepAspect):
            sides = [v for v in (img_size.long_side, *(img_size.shape or ())) if v is not None]
            if center_crop is not None or any(int(v) < 1 for v in sides):
                raise DataError(f"cannot cache images at {img_size}, center_crop={center_crop}: sizes must be "
                                "positive, and images kept at their aspect ratio are never cropped")
        elif int(img_size) < 1 or (center_crop is not None and not 0 < int(center_crop) <= int(img_size)):
            raise DataError(f"cannot cache images at img_size={img_size}, center_crop={center_crop}: the size must be "
                            "positive and the crop no larger than it")
        workers = workers or min(8, os.cpu_count() or 1)
        shards, built = [], 0
        for (dataset, category), group in manifest.groupby(["dataset", "category"], sort=True):
            shard, new = _ensure_shard(group, Path(cache_root), str(dataset), str(category),
                                       img_size, center_crop, workers)
            shards.append(shard)
            built += new
        return cls(shards, img_size, center_crop, built)


def cache_key(entries: list[tuple[str, str]], img_size: ImageSize, center_crop: int | None) -> dict:
    """What a shard depends on: every source file's path, size and mtime, and the output size."""
    size = img_size.to_json() if isinstance(img_size, KeepAspect) else int(img_size)
    return {"format": CACHE_FORMAT, "img_size": size,
            "center_crop": None if center_crop is None else int(center_crop),
            "files": [[image, *_stat(image), mask, *(_stat(mask) if mask else (0, 0))]
                      for image, mask in entries]}


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path} is listed in the manifest but does not exist; index the data set again (the workflow re-prepares changed data on its next run; force it with `snakemake --forcerun prepare`)") from None
    return info.st_size, info.st_mtime_ns


def _ensure_shard(group: pd.DataFrame, cache_root: Path, dataset: str, category: str, img_size: ImageSize,
                  center_crop: int | None, workers: int) -> tuple[CacheShard, bool]:
    unique = group.drop_duplicates("image_path").sort_values("image_path")
    entries = list(zip(unique["image_path"].astype(str), unique["mask_path"].astype(str)))
    key = cache_key(entries, img_size, center_crop)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = (img_size.label if isinstance(img_size, KeepAspect)
              else f"{img_size}px" + (f"-crop{center_crop}" if center_crop else ""))
    base = cache_root / check_name(dataset, "dataset") / check_name(category, "category") / folder
    final = base / digest
    reusable = _reusable(base, key)
    if reusable is not None:
        return reusable, False
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / ".lock")):
        reusable = _reusable(base, key)  # another process may have built it while we waited
        if reusable is not None:
            return reusable, False
        start = time.perf_counter()
        remove_stale_builds(base)
        tmp = temporary_name(base / "build")
        tmp.mkdir(mode=dir_mode())
        try:
            checksums = _decode_into(tmp, entries, img_size, center_crop, workers)
            (tmp / "key.json").write_text(json.dumps({**key, "checksums": checksums}), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)  # an unreadable shard of the same name
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in base.iterdir():  # earlier versions and leftovers of killed builds
            if old.is_dir() and old != final:
                shutil.rmtree(old, ignore_errors=True)
    log.info("built image cache %s: %d images in %.1f s", final, len(entries), time.perf_counter() - start)
    return CacheShard(final, [image for image, _ in entries]), True


def _reusable(base: Path, key: dict) -> CacheShard | None:
    """A complete shard under ``base`` with the same settings holding every wanted file unchanged
    (a shard of the whole category also serves its train-only or test-only subsets)."""
    if not base.is_dir():
        return None
    wanted = {tuple(row) for row in key["files"]}
    for directory in sorted(base.iterdir()):
        if directory.name.startswith("."):  # the lock file and builds in progress
            continue
        try:
            stored = json.loads((directory / "key.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not a shard, or one still being built
        files = [tuple(row) for row in stored.pop("files")]
        checksums = stored.pop("checksums", None)
        if stored == {k: v for k, v in key.items() if k != "files"} and wanted <= set(files):
            if _intact(directory, checksums):
                return CacheShard(directory, [row[0] for row in files])
            shutil.rmtree(directory, ignore_errors=True)
    return None


def _intact(directory: Path, checksums: dict | None) -> bool:
    """Sizes (always) and CRC-32s (once per process) of a shard's arrays match key.json."""
    if not checksums:
        return False
    for name, expected in checksums.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            warnings.warn(f"image cache shard {directory} is damaged ({name}: "
                          f"{path.stat().st_size if path.is_file() else 'missing'} bytes, expected "
                          f"{expected['bytes']}); rebuilding it", DataWarning, stacklevel=4)
            return False
    stamp = (directory / "key.json").stat().st_mtime_ns
    if _VERIFIED.get(str(directory)) == stamp:
        return True
    for name, expected in checksums.items():
        if _crc32(directory / name) != expected["crc32"]:
            warnings.warn(f"image cache shard {directory} is damaged ({name} changed since it was written); "
                          "rebuilding it", DataWarning, stacklevel=4)
            return False
    _VERIFIED[str(directory)] = stamp
    return True


def _crc32(path: Path, chunk: int = 16 << 20) -> int:
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            value = zlib.crc32(block, value)
    return value


def remove_stale_builds(base: Path) -> None:
    """Temporaries of builds whose process died (called under the shard lock)."""
    remove_stale_temporaries(base)
    for old in base.glob(".build-*"):  # the naming of earlier versions
        shutil.rmtree(old, ignore_errors=True)


def _reserve(path: Path, directory: Path, needed: int) -> None:
    """Allocate every block of a memory-mapped file now: a full disk is then an OSError here,
    not a SIGBUS when a page is first written."""
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
    except OSError as err:
        raise DataError(f"not enough disk space for the image cache in {directory.parent} ({err.strerror}): it "
                        f"needs {needed / 2**20:.0f} MiB; free some space or put the cache elsewhere (Settings "
                        "cache_dir / ADLIB_CACHE_DIR; the workflow's results folder)") from None


def _decode_into(directory: Path, entries: list[tuple[str, str]], img_size: ImageSize,
                 center_crop: int | None, workers: int) -> dict:
    """Decode every entry into images.npy / masks.npy (and shapes.npy for a :class:`KeepAspect`
    size); return their sizes and CRC-32s."""
    ragged = isinstance(img_size, KeepAspect)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        shapes = np.array(list(pool.map(lambda entry: output_shape(entry[0], img_size, center_crop), entries)),
                          dtype=np.int64).reshape(-1, 2)
    pixels = int(shapes.prod(axis=1).sum())
    needed = pixels * 4 + 256
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DataError(f"not enough disk space for the image cache in {directory.parent}: it needs "
                        f"{needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free; free some space or put the "
                        "cache elsewhere (Settings cache_dir / ADLIB_CACHE_DIR; the workflow's results folder)")
    names = ["images.npy", "masks.npy"]
    if ragged:
        np.save(directory / "shapes.npy", shapes)
        names.append("shapes.npy")
        image_shape, mask_shape = (3 * pixels,), (pixels,)
    else:
        side = center_crop or img_size
        image_shape, mask_shape = (len(entries), side, side, 3), (len(entries), side, side)
    images = np.lib.format.open_memmap(directory / "images.npy", mode="w+", dtype=np.uint8, shape=image_shape)
    masks = np.lib.format.open_memmap(directory / "masks.npy", mode="w+", dtype=np.uint8, shape=mask_shape)
    for name in ("images.npy", "masks.npy"):
        _reserve(directory / name, directory, needed)
    starts = np.concatenate([[0], np.cumsum(shapes.prod(axis=1))])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        samples = pool.map(lambda entry: load_sample(entry[0], entry[1], img_size, center_crop), entries)
        for row, (image, mask) in enumerate(samples):
            if not ragged:
                images[row] = image
                masks[row] = mask
                continue
            if image.shape[:2] != tuple(shapes[row]):
                raise DataError(f"image {entries[row][0]} decoded to {image.shape[0]}x{image.shape[1]} but its file "
                                f"header says {shapes[row][0]}x{shapes[row][1]}: the file is damaged; replace it")
            start, stop = int(starts[row]), int(starts[row + 1])
            images[3 * start: 3 * stop] = image.reshape(-1)
            masks[start:stop] = mask.reshape(-1)
    images.flush()
    masks.flush()
    del images, masks
    return {name: {"bytes": (directory / name).stat().st_size, "crc32": _crc32(directory / name)}
            for name in names}
