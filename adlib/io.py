"""Atomic file and directory writes: a killed job never leaves a file that looks complete, and
what it leaves behind is recognised and removed by the next job.

* Files and folders are built under a temporary name tagged with the writer's host and process
  id (``.<name>.tmp-<host>-<pid>-<random>``) and renamed onto the target when complete.
* Outputs get the permissions the user's umask gives a normal file or folder (``0666 & ~umask``,
  ``0777 & ~umask``), so colleagues in the user's group can read them.
* :func:`remove_stale_temporaries` deletes temporaries whose writer is gone (same host, process
  no longer alive); every job calls it on the folders it writes to.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
#: ``.<name>.tmp-<host>-<pid>-<random><suffix>``: the temporaries this module (and its users) create
_TEMP_RE = re.compile(r"^\..*\.tmp-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode the user's umask gives a new regular file."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode the user's umask gives a new folder."""
    return 0o777 & ~_umask()


def temporary_name(target: Path) -> Path:
    """A fresh, owner-tagged temporary path beside ``target`` (keeps its suffix)."""
    return target.parent / f".{target.stem}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary file keeps the target's suffix so writers that infer a format from the
    extension (matplotlib, pandas) still work. On error the temporary file is removed and the
    old target, if any, is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temporary_name(target)
    tmp_path.touch(mode=0o666, exist_ok=False)  # mode 0666 & ~umask, like any new file
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it onto ``target`` when the block ends
    without error: readers see the old complete folder or the new complete one, never a mix.

    On error the partial folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    stage = temporary_name(target.with_suffix(""))
    stage.mkdir(mode=dir_mode())
    try:
        yield stage
        swap_into_place(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def swap_into_place(new: Path, target: Path) -> None:
    """Replace folder (or file) ``target`` by ``new`` with two renames; the old one is deleted
    afterwards. If the process dies between the renames, the old folder survives under its
    temporary name and :func:`remove_stale_temporaries` puts it back."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.old"
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and make sure this process can write there, before any
    expensive work (an ``OSError`` names the folder otherwise)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(directory / "write-check")
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise OSError(err.errno, f"cannot write to {directory} ({err.strerror}): choose another output folder "
                                 "or fix its permissions") from None
    return directory


def publish_staged(stage: Path, target: Path, last: str | None = None) -> None:
    """Move every entry of folder ``stage`` into folder ``target`` (sub-folders swapped whole),
    ``last`` after all others; then remove ``stage``."""
    target.mkdir(parents=True, exist_ok=True)
    entries = sorted(stage.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        if entry.is_dir():
            swap_into_place(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)
    stage.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporaries in ``directory`` left by dead writers of this host; return them.

    A swapped-out old folder (``....old``) whose target is missing is renamed back instead
    (its writer died between the two renames of :func:`swap_into_place`).
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMP_RE.match(path.name)
        if not match or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if path.name.endswith(".old"):
            original = directory / path.name[1:].split(".tmp-")[0]
            if not original.exists():
                os.rename(path, original)
                continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
