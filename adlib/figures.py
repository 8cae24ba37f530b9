"""Matplotlib figures without pyplot: no global backend or figure registry is touched (safe in
workers and headless jobs), and PNGs are written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adlib.io import atomic_path

DPI = 100


def new_figure(width: float, height: float, ncols: int = 1, dpi: int = DPI) -> tuple[Figure, list[Any]]:
    """A figure with ``ncols`` side-by-side axes (always returned as a list)."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = DPI, tight: bool = True,
                bbox_inches: str | None = None) -> Path:
    """Lay out and write ``fig`` as PNG to ``path`` (temporary name, then rename)."""
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches=bbox_inches)
    return Path(path)
