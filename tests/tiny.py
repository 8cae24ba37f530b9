"""Tiny training data for model and loop tests: images as loader dicts, and one helper that
trains through the one loop (adlib.training.fit), as every run does."""
from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset

from adlib.models.base import FitContext
from adlib.training import FitData, FitReport, fit


class ImageItems(Dataset):
    """Images (and optional labels / masks) as the dicts ImageDataset yields."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 masks: torch.Tensor | None = None) -> None:
        self.images = images
        self.labels = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)
        self.masks = masks if masks is not None else torch.zeros(len(images), 1, *images.shape[-2:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "mask": self.masks[i], "index": i}


def loader(images: torch.Tensor, batch_size: int = 4, shuffle: bool = False, **items) -> DataLoader:
    return DataLoader(ImageItems(images, **items), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def fit_on(model, images: torch.Tensor, *, batch_size: int = 4, num_epochs: int | None = 1,
           max_steps: int | None = None, seed: int = 0, validation: torch.Tensor | None = None,
           aux: dict | None = None, **options) -> FitReport:
    """Train ``model`` on ``images`` through :func:`adlib.training.fit` on the CPU."""
    data = FitData(loader(images, batch_size), loader(validation, batch_size) if validation is not None else None,
                   aux or {})
    context = FitContext(device=torch.device("cpu"), seed=seed, img_size=int(images.shape[-1]))
    return fit(model, data, context, num_epochs=num_epochs, max_steps=max_steps, progress=False, **options)


def required_streams(model, size: int, seed: int = 0) -> dict:
    """Endless random-image batches for each auxiliary stream ``model`` declares without a
    fallback (what the data layer would stream from its folder)."""
    def batches(batch_size: int, side: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.rand(batch_size, 3, side, side, generator=g)

    return {s.name: batches(s.batch_size or 4, s.size or size) for s in model.auxiliary_streams() if s.fallback is None}


def normal_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Noisy horizontal ramps of slightly different brightness."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, size).view(1, 1, 1, size).expand(n, 3, size, size)
    images = ramp * (0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))
    return (images + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def with_defect(images: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A saturated red square over a quarter of each image, at a seeded place."""
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    n, _, h, w = out.shape
    s = h // 2
    for i in range(n):
        y, x = (int(torch.randint(0, h - s + 1, (1,), generator=g)) for _ in range(2))
        out[i, :, y:y + s, x:x + s] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return out


@contextlib.contextmanager
def registered_variant(name: str, base: str, **facts):
    """Register a configuration for one test only (``register_variant`` arguments)."""
    from adlib.models import registry

    spec = registry.register_variant(name, base=base, **facts)
    try:
        yield spec
    finally:
        registry._REGISTRY.pop(spec.name, None)


def write_images(folder, n: int = 3, size: tuple[int, int] = (20, 30), suffix: str = ".png", seed: int = 0) -> list:
    """``n`` random RGB image files in ``folder`` (created); returns their paths."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{folder.name}_{i:04d}{suffix}" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(path)
    return paths
