"""File-system helpers shared by the indexers: safe names, image listing, mask look-up."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from adlib.data.manifest import DataError, DataWarning

#: Image file extensions every indexer accepts, in any case (".PNG", ".JPG" ...).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_SILENT = {"thumbs.db", "desktop.ini"}  # operating-system litter, skipped without a warning


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def check_name(name: object, what: str) -> str:
    """Reject names that are not one plain path component ('..', 'a/b', absolute paths, '')."""
    text = str(name)
    if (not text or text in {".", ".."} or "/" in text or "\\" in text or "\x00" in text
            or os.path.isabs(text)):
        raise DataError(f"invalid {what} name {text!r}: it must be a single folder name inside the "
                        "data root (no '/', '\\', '..' or absolute paths)")
    return text


def require_dir(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """Return ``path`` as an absolute directory, or raise naming it."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"{what} {path} {state}" + (f"; {hint}" if hint else ""))
    return path


def category_dir(root: Path, category: str, available: list[str]) -> Path:
    """``root/category`` after checking the name, with the available categories in the error."""
    path = root / check_name(category, "category")
    if not path.is_dir():
        listed = ", ".join(available) if available else "none"
        raise DataError(f"category {category!r} not found: {path} does not exist. "
                        f"Categories under {root}: {listed}")
    return path


def list_images(directory: Path) -> list[Path]:
    """Sorted image files directly inside ``directory`` ([] when it does not exist).

    Files with other extensions are skipped with one :class:`DataWarning` per folder; hidden
    files and sub-folders are skipped silently.
    """
    if not Path(directory).is_dir():
        return []
    images, skipped = [], []
    for entry in sorted(Path(directory).iterdir()):
        if entry.name.startswith(".") or entry.name.lower() in _SILENT or not entry.is_file():
            continue
        (images if is_image(entry) else skipped).append(entry)
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"ignored {len(skipped)} file(s) in {directory} that are not images "
                      f"({shown}); accepted extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}",
                      DataWarning, stacklevel=2)
    return images


def images_by_stem(directory: Path) -> dict[str, Path]:
    """Map file stem -> path for the images in ``directory`` (empty when it does not exist)."""
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.iterdir()) if p.is_file() and is_image(p)}


def subdirs(directory: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``directory`` ([] when it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
