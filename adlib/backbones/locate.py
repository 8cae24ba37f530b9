"""Where a backbone's weights are: the backbone directory, then installed pip weight packages.

Path logic only (no torch, no timm), so the CLI and the workflow's preflight check can look
weights up in milliseconds; :mod:`adlib.backbones.weights` reads and loads them.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adlib.backbones.catalog import WeightPackage, candidate_files, catalog_entry
from adlib.io import sha256_file

log = logging.getLogger(__name__)


class MissingWeightsError(FileNotFoundError):
    """No weights for a backbone: the message names the expected files, where they go and the
    command that fetches them on a connected machine."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights were found."""

    name: str
    path: Path
    package: str | None = None  # pip distribution, when the file ships in an installed package

    def provenance(self, fmt: str | None = None) -> dict[str, Any]:
        return {"backbone": self.name,
                "source": f"pip:{self.package}:{self.path}" if self.package else str(self.path),
                "sha256": cached_sha256(self.path), "format": fmt}


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


# reading ---------------------------------------------------------------------------------------
def package_file(package: WeightPackage) -> Path | None:
    """The weight file inside an installed pip package (located without importing it)."""
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob(package.pattern))
        if found:
            return found[0]
    return None


def find_in_dir(name: str, backbone_dir: str | Path | None) -> list[Path]:
    """Existing files for ``name`` in the backbone directory, in preference order."""
    if backbone_dir is None or not Path(backbone_dir).is_dir():
        return []
    root = Path(backbone_dir)
    hits: list[Path] = []
    for rel in candidate_files(name):
        matches = sorted(root.glob(rel)) if any(c in rel for c in "*?[") else [root / rel]
        hits.extend(p for p in matches if p.is_file() and p not in hits)
    return hits


def resolve_weights(name: str, backbone_dir: str | Path | None) -> WeightsSource:
    """First weight file for ``name``: backbone directory, then installed weight packages."""
    in_dir = find_in_dir(name, backbone_dir)
    if in_dir:
        if len(in_dir) > 1:
            log.info("backbone %s: using %s (also present: %s)", name, in_dir[0], ", ".join(map(str, in_dir[1:])))
        return WeightsSource(name, in_dir[0])
    for package in catalog_entry(name).packages:
        path = package_file(package)
        if path is not None:
            return WeightsSource(name, path, package=package.requirement)
    raise MissingWeightsError(missing_message(name, backbone_dir))


def missing_message(name: str, backbone_dir: str | Path | None) -> str:
    """The text of MissingWeightsError: expected files, where they go, how to fetch them."""
    entry = catalog_entry(name)
    files = candidate_files(name)
    lines = [f"no offline weights for backbone {name!r} ({entry.description})."]
    if backbone_dir is None:
        target = "<backbone_dir>"
        lines.append("No backbone directory was given (set Settings.backbone_dir, ADLIB_BACKBONE_DIR or "
                     "--backbone-dir); it is searched for any of:")
    else:
        target = str(Path(backbone_dir).resolve())
        exists = "" if Path(backbone_dir).is_dir() else " (it does not exist)"
        lines.append(f"Looked in the backbone directory {target}{exists} for any of:")
    lines += [f"    {f}" for f in files]
    for package in entry.packages:
        lines.append(f"and in the pip package {package.requirement} (not installed)")
    lines += [f"Expected file: {target}/{entry.primary}",
              "Fetch it on a machine with internet access (writes "
              f"./{entry.primary}), then copy it into {target}/:",
              f"    {entry.fetch}"]
    for package in entry.packages:
        lines.append(f"Or install the weights package: {package.install_command}")
    lines.append("(Nothing is downloaded at run time; tests use pretrained=False for random weights.)")
    return "\n".join(lines)
