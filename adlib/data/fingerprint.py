"""A cheap fingerprint of a data set category's files (names, sizes, modification times), so the
workflow notices added, removed or replaced images and masks without listing every image as an
input: it is a param of the prepare rule."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: files of a layout outside the category folder that decide its manifest
_EXTRA_FILES = {"visa": ("split_csv/1cls.csv",)}


def source_paths(layout: str, root: str | os.PathLike, category: str) -> list[Path]:
    """The folders and files whose contents decide the manifest of ``category``."""
    root = Path(root)
    if layout == "synthetic":
        return []  # generated from its options, which the workflow tracks itself
    if layout == "custom":
        return [root]  # one data_rgb tree (and data_info.csv) per data set
    return [root / category, *(root / extra for extra in _EXTRA_FILES.get(layout, ()))]


def data_fingerprint(layout: str, root: str | os.PathLike, category: str) -> str:
    """16 hex digits over (relative path, size, mtime) of every file below the source paths."""
    digest = hashlib.sha256()
    for base in source_paths(layout, root, category):
        for path, size, mtime in _walk(base):
            digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def _walk(base: Path):
    if base.is_file():
        info = base.stat()
        yield base.name, info.st_size, info.st_mtime_ns
        return
    entries = []
    for folder, dirs, files in os.walk(base):
        dirs.sort()
        for name in files:
            path = Path(folder) / name
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            entries.append((str(path.relative_to(base)), info.st_size, info.st_mtime_ns))
    yield from sorted(entries)
