"""The stages of a job: freed memory handed back between them, and their peak resident memory.

The steps mark their stages (``with stage("scoring"): ...``). Every boundary returns the
blocks the allocator keeps for reuse (:func:`adlib.allocator.release_freed_memory`), so one
stage's freed buffers do not stay resident under the next one's. Once :func:`enable` has
been called (benchmarks/bench_memory.py), each stage also records the highest resident set
size the process reached while it ran, and the time between stages is recorded as
``"other"`` (model building and loading, data indexing). Linux only: the kernel's high-water
mark (``VmHWM``) is reset at every stage boundary through ``/proc/self/clear_refs``. That
reset also lowers what ``getrusage`` reports as the process's peak, which is why recording is
off by default: while enabled, the peak of the whole process is the largest stage peak
(:func:`process_peak_mib`).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

from adlib.allocator import release_freed_memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK = "5"  # clear_refs: reset the resident high-water mark
#: the label of the time outside any marked stage
OTHER = "other"

_peaks: dict[str, float] = {}
_enabled = False
_current = OTHER


def enable() -> bool:
    """Start recording stage peaks in this process; False where the kernel offers no reset."""
    global _enabled
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK)
        _high_water_mib()
    except (OSError, ValueError):
        return False
    _enabled = True
    return True


def _high_water_mib() -> float:
    match = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError("no VmHWM line in /proc/self/status")
    return int(match.group(1)) / 1024.0


def _close_segment(next_label: str) -> None:
    """Record the peak since the last boundary under the current label; start ``next_label``."""
    global _current
    _peaks[_current] = max(_peaks.get(_current, 0.0), _high_water_mib())
    _CLEAR_REFS.write_text(_RESET_PEAK)
    _current = next_label


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage of a job (stages do not nest: an inner mark is ignored)."""
    if _current != OTHER:
        yield
        return
    _boundary(name)
    try:
        yield
    finally:
        _boundary(OTHER)


def _boundary(next_label: str) -> None:
    global _current
    release_freed_memory()
    if _enabled:
        _close_segment(next_label)
    else:
        _current = next_label


def stage_peaks() -> dict[str, float]:
    """Peak RSS (MiB) of every stage so far, ``"other"`` included; empty unless enabled."""
    if not _enabled:
        return {}
    return {**_peaks, _current: max(_peaks.get(_current, 0.0), _high_water_mib())}


def process_peak_mib() -> float:
    """Peak RSS of the whole process since :func:`enable` (the largest stage peak)."""
    return max(stage_peaks().values(), default=0.0)
