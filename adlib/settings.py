"""Explicit, frozen run settings (paths, seed, workers) instead of mutable globals.

Resolution order for each field: explicit argument > environment variable > config file >
default. Environment variables: ADLIB_DATA_ROOT, ADLIB_BACKBONE_DIR, ADLIB_OUTPUT_DIR,
ADLIB_SEED, ADLIB_NUM_WORKERS, ADLIB_DEVICE, ADLIB_THREADS, ADLIB_CACHE_DIR, ADLIB_KEEP_FREED_MEMORY
(0/false/no/off or 1/true), ADLIB_SCORING_BATCH_SIZE, ADLIB_SETTINGS (path of a YAML/JSON file).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

_ENV = {
    "data_root": "ADLIB_DATA_ROOT",
    "backbone_dir": "ADLIB_BACKBONE_DIR",
    "output_dir": "ADLIB_OUTPUT_DIR",
    "seed": "ADLIB_SEED",
    "num_workers": "ADLIB_NUM_WORKERS",
    "device": "ADLIB_DEVICE",
    "cache_dir": "ADLIB_CACHE_DIR",
    "threads": "ADLIB_THREADS",
    "keep_freed_memory": "ADLIB_KEEP_FREED_MEMORY",
    "scoring_batch_size": "ADLIB_SCORING_BATCH_SIZE",
}
_INTEGERS = ("seed", "num_workers", "threads", "scoring_batch_size")
_POSITIVE_OR_NONE = ("threads", "scoring_batch_size")
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where data, weights and outputs live, and how runs are seeded and executed."""

    data_root: Path = Path("datasets")
    backbone_dir: Path = Path("backbones")
    output_dir: Path = Path("outputs")
    cache_dir: Path | None = None  # decoded-image cache; defaults to <output_dir>/.cache
    seed: int = 42
    num_workers: int = 0
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    threads: int | None = None  # torch's intra-op threads (None: torch's default); results can depend on it
    #: keep freed CPU buffers in the process for reuse (adlib.allocator: CPU forwards 3x faster;
    #: False gives glibc's defaults: lower peak memory, slower)
    keep_freed_memory: bool = True
    #: images per batch when scoring (test, calibration, new images); None: the configuration's
    #: batch size on accelerators, at most ``CPU_SCORING_BATCH`` on the CPU (adlib.run.loaders)
    scoring_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("data_root", "backbone_dir", "output_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)).expanduser())
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        for name in _INTEGERS:
            value = getattr(self, name)
            if value is None and name in _POSITIVE_OR_NONE:
                continue
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"setting {name!r} must be an integer, got {value!r}") from None
            if number < (1 if name in _POSITIVE_OR_NONE else 0):
                raise ValueError(f"setting {name!r} must be {'positive' if name in _POSITIVE_OR_NONE else '>= 0'}, "
                                 f"got {number}")
            object.__setattr__(self, name, number)
        if isinstance(self.keep_freed_memory, str):
            object.__setattr__(self, "keep_freed_memory", self.keep_freed_memory.strip().lower() not in _FALSE)

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.output_dir / ".cache"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> "Settings":
        """Build settings from a file (YAML or JSON), the environment and explicit overrides."""
        values: dict[str, Any] = {}
        path = path or os.environ.get("ADLIB_SETTINGS")
        if path:
            values.update(_read_settings_file(Path(path)))
        for field, env in _ENV.items():
            if env in os.environ:
                values[field] = os.environ[env]
                if field in _INTEGERS and not os.environ[env].strip().lstrip("-").isdigit():
                    raise ValueError(f"environment variable {env}={os.environ[env]!r} is not an integer")
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"unknown settings {sorted(unknown)}; valid settings are: {valid}")
        return cls(**values)


def _read_settings_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"settings file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path} must hold a mapping of setting -> value")
    return data
