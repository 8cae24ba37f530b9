"""What is in a backbone directory, and whether it is intact (sha256 against a manifest).

Manifest: ``<backbone_dir>/SHA256SUMS.json`` (``{relative_path: sha256}``, written by
:func:`write_checksums`) or a ``sha256sum``-style text file (``<sha256>  <relative_path>`` per
line, e.g. ``SHA256SUMS``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from adlib.backbones.catalog import CATALOG, WEIGHT_SUFFIXES
from adlib.backbones.locate import MissingWeightsError, find_in_dir, package_file
from adlib.io import sha256_file, write_json

MANIFEST_NAMES = ("SHA256SUMS.json", "SHA256SUMS", "SHA256SUMS.txt")
_SHA_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class ManifestError(ValueError):
    """A checksum manifest is absent, unreadable or names a path outside the backbone directory."""


def weight_files(backbone_dir: str | Path) -> list[Path]:
    """Every weight file under the directory (hidden files and folders skipped), sorted."""
    root = Path(backbone_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def list_backbones(backbone_dir: str | Path | None) -> list[dict[str, Any]]:
    """One row per catalog entry (present or not) plus one per other weight file in the directory.

    Row keys: name, present, kind ("file" | "package" | None), source (path or pip requirement),
    path, size (bytes), expected (conventional file), fetch (command, when missing), description.
    """
    rows: list[dict[str, Any]] = []
    claimed: set[Path] = set()
    for entry in CATALOG.values():
        hits = find_in_dir(entry.name, backbone_dir)
        claimed.update(p.resolve() for p in hits)
        row = {"name": entry.name, "present": False, "kind": None, "source": None, "path": None, "size": None,
               "expected": entry.primary, "fetch": None, "description": entry.description}
        if hits:
            row.update(present=True, kind="file", source=str(hits[0]), path=str(hits[0]), size=hits[0].stat().st_size)
        else:
            for package in entry.packages:
                path = package_file(package)
                if path is not None:
                    row.update(present=True, kind="package", source=f"pip:{package.requirement}", path=str(path),
                               size=path.stat().st_size)
                    break
        if not row["present"]:
            row["fetch"] = entry.fetch
        rows.append(row)
    if backbone_dir is not None:
        root = Path(backbone_dir)
        for path in weight_files(root):
            if path.resolve() not in claimed:
                rel = path.relative_to(root).as_posix()
                rows.append({"name": rel, "present": True, "kind": "file", "source": str(path), "path": str(path),
                             "size": path.stat().st_size, "expected": None, "fetch": None,
                             "description": "not in the catalog (load it by a timm name that finds this file)"})
    return rows


def default_manifest(backbone_dir: str | Path) -> Path:
    """The first existing manifest name in the directory, else where SHA256SUMS.json would go."""
    root = Path(backbone_dir)
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    return root / MANIFEST_NAMES[0]


def read_manifest(path: str | Path) -> dict[str, str]:
    """{relative_path: sha256} from a JSON or sha256sum-style manifest."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no checksum manifest. Create one where the files are known good with "
                            "`adlib backbones checksum --backbone-dir DIR` (adlib.backbones.write_checksums), "
                            "or copy the SHA256SUMS.json that came with the weights.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v)
                                                 for v in data.values()):
            raise ManifestError(f"{path}: expected an object {{relative_path: sha256 hex}}")
        entries = {str(k): v.lower() for k, v in data.items()}
    else:
        entries = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _SHA_LINE.match(line.rstrip("\n"))
            if not match:
                raise ManifestError(f"{path}, line {number}: expected '<sha256>  <relative path>', got {line!r}")
            entries[match.group(2)] = match.group(1).lower()
    for rel in entries:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel.startswith("\\"):
            raise ManifestError(f"{path}: entry {rel!r} is not a path inside the backbone directory")
    return entries


def verify_backbones(backbone_dir: str | Path, manifest: str | Path | None = None) -> list[dict[str, Any]]:
    """Check every manifest entry's sha256; rows {path, status, expected, actual, size}.

    status: "ok", "mismatch" (corrupt or replaced file), "missing", or "unlisted" (a weight file
    in the directory that the manifest does not name).
    """
    root = Path(backbone_dir)
    if not root.is_dir():
        raise MissingWeightsError(f"backbone directory {root.resolve()} does not exist")
    manifest_path = Path(manifest) if manifest is not None else default_manifest(root)
    entries = read_manifest(manifest_path)
    rows = []
    for rel, expected in sorted(entries.items()):
        path = root / rel
        if not path.is_file():
            rows.append({"path": rel, "status": "missing", "expected": expected, "actual": None, "size": None})
            continue
        actual = sha256_file(path)
        rows.append({"path": rel, "status": "ok" if actual == expected else "mismatch", "expected": expected,
                     "actual": actual, "size": path.stat().st_size})
    for path in weight_files(root):
        rel = path.relative_to(root).as_posix()
        if rel not in entries:
            rows.append({"path": rel, "status": "unlisted", "expected": None, "actual": None,
                         "size": path.stat().st_size})
    return rows


def write_checksums(backbone_dir: str | Path, manifest: str | Path | None = None) -> Path:
    """Hash every weight file in the directory into a JSON manifest (atomically); returns its path."""
    root = Path(backbone_dir)
    if not root.is_dir():
        raise MissingWeightsError(f"backbone directory {root.resolve()} does not exist")
    target = Path(manifest) if manifest is not None else root / MANIFEST_NAMES[0]
    sums = {p.relative_to(root).as_posix(): sha256_file(p) for p in weight_files(root)}
    return write_json(target, sums)
