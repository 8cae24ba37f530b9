"""Deterministic small data sets for tests, demos and the workflow's built-in default.

Every category is a fixed "product": a woven, softly shaded background texture with a round
part (body, ring, centre hole) in the middle. Normal images differ only by a shift of up to half a pixel,
a small brightness change and sensor noise, so a detector can learn them from a few images.
Defective images carry one of four defects, with an exact mask (the pixels the defect changed):

* ``scratch``: a thin dark or bright line;
* ``blob``: an irregular dark spot;
* ``missing``: a bite out of the part's edge (background shows through);
* ``stain``: an irregular colour tint.

``defect_strength`` (1 by default) scales how far a defect departs from the normal look and its
size: 0.3 gives faint, small defects that separate detectors (the workflow's built-in default).

``make_dataset`` writes the MVTec, VisA, BTAD or custom layout; ``make_textures`` and
``make_imagenet_like`` write tiny DTD- and Imagenette-layout folders. ``make_surface_dataset``
writes large non-square images of a woven surface with small spot defects (tiling tests and
benchmarks). Same arguments, same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image

DEFECTS = ("scratch", "blob", "missing", "stain")
LAYOUT_NAMES = ("mvtec", "visa", "btad", "custom")
CUSTOM_DATASET = "synthetic"  # dataset folder of the custom layout: <root>/synthetic/data_rgb
MARKER = ".synthetic.json"


# ----------------------------------------------------------------------------- rendering
class _Product:
    """The fixed look of one category, drawn from its own seeded generator."""

    def __init__(self, category: str, seed: int) -> None:
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        self.background = rng.uniform(0.35, 0.6, 3)
        self.body = np.clip(self.background + rng.choice([-1, 1]) * rng.uniform(0.2, 0.3, 3), 0.05, 0.95)
        self.ring = np.clip(self.body * rng.uniform(0.5, 0.7), 0.0, 1.0)
        self.waves = [(rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0, 2 * np.pi), 0.03)
                      for _ in range(4)]  # soft shading: low-frequency waves
        freq = rng.uniform(8, 12)
        self.weave = (freq, rng.uniform(0, np.pi), 0.05)
        self.radius = rng.uniform(0.28, 0.34)

    def render(self, size: int, dx: float, dy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image, background alone (both ``S x S x 3`` float) and the part's mask, shifted by (dx, dy)."""
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        u, v = (x - dx) / size, (y - dy) / size
        shade = sum(a * np.sin(2 * np.pi * (fx * u + fy * v) + p) for fx, fy, p, a in self.waves)
        freq, angle, amp = self.weave
        weave = amp * np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v + angle)
        background = np.clip(self.background + (shade + weave)[..., None], 0, 1)
        r = np.hypot(u - 0.5, v - 0.5)
        part = (r < self.radius) & (r > 0.18 * self.radius)
        ring = part & (np.abs(r - 0.6 * self.radius) < 0.08 * self.radius)
        image = background.copy()
        image[part] = self.body + 0.5 * shade[part, None]
        image[ring] = self.ring
        return image, background, part


def _defect(kind: str, image: np.ndarray, background: np.ndarray, part: np.ndarray,
            rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Draw one defect into ``image`` (in place) with opacity and size scaled by ``strength``;
    return its exact boolean mask."""
    size = image.shape[0]
    scale = 0.5 + 0.5 * strength  # sizes shrink to half at strength 0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.45) * size * scale
        ex, ey = np.cos(angle), np.sin(angle)
        along = np.clip((x - cx) * ex + (y - cy) * ey, -length / 2, length / 2)
        dist = np.hypot(x - cx - along * ex, y - cy - along * ey)
        mask = dist < max(0.75, rng.uniform(0.008, 0.018) * size)
        colour = np.full(3, 0.08 if image[mask].mean() > 0.45 else 0.95)  # contrast with what it crosses
        image[mask] = 0.85 * strength * colour + (1 - 0.85 * strength) * image[mask]
    elif kind == "missing":
        ys, xs = np.nonzero(part)
        edge = np.argmax(np.hypot(xs - size / 2, ys - size / 2) * (1 + 0.01 * rng.random(xs.size)))
        mask = part & (np.hypot(x - xs[edge], y - ys[edge]) < rng.uniform(0.12, 0.18) * size * scale)
        image[mask] = strength * background[mask] + (1 - strength) * image[mask]
    else:  # blob or stain: an irregular ellipse
        a, b = rng.uniform(0.06, 0.11, 2) * size * scale
        theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        xr = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        yr = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        wobble = 1 + 0.2 * np.sin(3 * np.arctan2(yr, xr) + phase)
        mask = np.hypot(xr / a, yr / b) < wobble
        if kind == "blob":
            dark = image[mask].mean() > 0.4  # dark spot on light parts, pale deposit on dark ones
            colour = np.array([0.15, 0.12, 0.08]) if dark else np.array([0.75, 0.72, 0.62])
            image[mask] = (1 - 0.65 * strength) * image[mask] + 0.65 * strength * colour
        else:
            tint = np.array([0.85, 0.45, 0.1]) if rng.random() < 0.5 else np.array([0.2, 0.45, 0.85])
            image[mask] = (1 - 0.55 * strength) * image[mask] + 0.55 * strength * tint
    return mask


def sample(category: str, kind: str, index: int, size: int = 64, seed: int = 0,
           defect_strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One image (``S x S x 3`` uint8) and mask (``S x S`` bool); ``kind`` is "train", "good" or a defect."""
    product = _Product(category, seed)
    rng = np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(kind.encode()), index])
    dx, dy = rng.uniform(-0.5, 0.5, 2)
    image, background, part = product.render(size, dx, dy)
    mask = np.zeros((size, size), dtype=bool)
    if kind in DEFECTS:
        mask = _defect(kind, image, background, part, rng, defect_strength)
    image = image * rng.uniform(0.97, 1.03) + rng.normal(0, 0.015, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


# ----------------------------------------------------------------------------- layouts
def make_dataset(layout: str, root: str | os.PathLike, *, categories: Iterable[str] = ("widget",),
                 n_train: int = 8, n_test_good: int = 4, n_test_bad: int = 4, size: int = 64,
                 seed: int = 0, defect_strength: float = 1.0) -> Path:
    """Write a small data set in ``layout`` (mvtec, visa, btad, custom) under ``root``; return ``root``.

    Defective images cycle through :data:`DEFECTS`. The custom layout goes to
    ``<root>/synthetic/data_rgb`` (index it with ``dataset="synthetic"``).
    """
    if layout not in LAYOUT_NAMES:
        raise ValueError(f"unknown synthetic layout {layout!r}; choose one of {LAYOUT_NAMES}")
    if not 0 < defect_strength <= 1:
        raise ValueError(f"defect_strength must be in (0, 1], got {defect_strength}")
    root = Path(root)
    csv_rows = []
    for category in categories:
        normals = [sample(category, "train", i, size, seed)[0] for i in range(n_train)]
        goods = [sample(category, "good", i, size, seed)[0] for i in range(n_test_good)]
        bads = [(DEFECTS[i % len(DEFECTS)], *sample(category, DEFECTS[i % len(DEFECTS)], i, size, seed,
                                                     defect_strength)) for i in range(n_test_bad)]
        if layout == "mvtec":
            _write_mvtec(root / category, normals, goods, bads)
        elif layout == "btad":
            _write_btad(root / category, normals, goods, bads)
        elif layout == "visa":
            csv_rows += _write_visa(root, category, normals, goods, bads)
        else:
            _write_custom(root / CUSTOM_DATASET / "data_rgb", category, normals + goods, bads)
    if layout == "visa":
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(csv_rows, columns=["object", "split", "label", "image", "mask"]).to_csv(
            root / "split_csv" / "1cls.csv", index=False)
    return root


def surface_sample(kind: str, index: int, height: int, width: int, defect_size: int = 5,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One image of a large woven surface (``H x W x 3`` uint8: fine weave, soft shading, sensor
    noise) and its mask; ``kind`` "spot" adds one dark or bright round spot ``defect_size`` pixels
    across at a random place: a defect that resizing a large image to a model's input erases."""
    rng = np.random.default_rng([seed, zlib.crc32(kind.encode()), index])
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = rng.uniform(0, 6, 2)
    weave = 0.06 * np.sin(2 * np.pi * (x + dx) / 6) * np.sin(2 * np.pi * (y + dy) / 6)
    shade = 0.05 * np.sin(2 * np.pi * (x / width + y / height) + rng.uniform(0, 2 * np.pi))
    image = np.array([0.55, 0.5, 0.42]) + (weave + shade)[..., None]
    mask = np.zeros((height, width), dtype=bool)
    if kind == "spot":
        margin = defect_size + 2
        cy, cx = rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)
        mask = np.hypot(y - cy, x - cx) < defect_size / 2
        image[mask] = 0.1 if rng.random() < 0.5 else 0.95
    image = image * rng.uniform(0.97, 1.03) + rng.normal(0, 0.015, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def make_surface_dataset(root: str | os.PathLike, category: str = "surface", *, n_train: int = 8,
                         n_test_good: int = 4, n_test_bad: int = 4, height: int = 160, width: int = 192,
                         defect_size: int = 5, seed: int = 0) -> Path:
    """Write an MVTec-layout category of large non-square surface images with small spot defects
    (:func:`surface_sample`; defect type "spot") under ``root``; return ``root``."""
    def draw(kind, i):
        return surface_sample(kind, i, height, width, defect_size, seed)

    _write_mvtec(Path(root) / category, [draw("train", i)[0] for i in range(n_train)],
                 [draw("good", i)[0] for i in range(n_test_good)],
                 [("spot", *draw("spot", i)) for i in range(n_test_bad)])
    return Path(root)


def _save(path: Path, pixels: np.ndarray, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)


def _mask_pixels(mask: np.ndarray, value: int = 255) -> np.ndarray:
    return mask.astype(np.uint8) * value


def _write_mvtec(cat_dir: Path, normals, goods, bads) -> None:
    for i, pixels in enumerate(normals):
        _save(cat_dir / "train" / "good" / f"{i:03d}.png", pixels)
    for i, pixels in enumerate(goods):
        _save(cat_dir / "test" / "good" / f"{i:03d}.png", pixels)
    for i, (kind, pixels, mask) in enumerate(bads):
        _save(cat_dir / "test" / kind / f"{i:03d}.png", pixels)
        _save(cat_dir / "ground_truth" / kind / f"{i:03d}_mask.png", _mask_pixels(mask))


def _write_btad(cat_dir: Path, normals, goods, bads) -> None:
    for i, pixels in enumerate(normals):
        _save(cat_dir / "train" / "ok" / f"{i:04d}.bmp", pixels)
    for i, pixels in enumerate(goods):
        _save(cat_dir / "test" / "ok" / f"{i:04d}.bmp", pixels)
    for i, (_, pixels, mask) in enumerate(bads):
        _save(cat_dir / "test" / "ko" / f"{i:04d}.bmp", pixels)
        _save(cat_dir / "ground_truth" / "ko" / f"{i:04d}.png", _mask_pixels(mask))


def _write_visa(root: Path, category: str, normals, goods, bads) -> list[list[str]]:
    rows = []
    base = Path(category) / "Data"
    for i, pixels in enumerate(normals + goods):
        image = base / "Images" / "Normal" / f"{i:04d}.JPG"
        _save(root / image, pixels, quality=95)
        rows.append([category, "train" if i < len(normals) else "test", "normal", image.as_posix(), ""])
    for i, (kind, pixels, mask) in enumerate(bads):
        image, mask_file = base / "Images" / "Anomaly" / f"{i:03d}.JPG", base / "Masks" / "Anomaly" / f"{i:03d}.png"
        _save(root / image, pixels, quality=95)
        _save(root / mask_file, _mask_pixels(mask, 1 + DEFECTS.index(kind)))  # VisA masks: small class ids
        rows.append([category, "test", "anomaly", image.as_posix(), mask_file.as_posix()])
    return rows


def _write_custom(image_root: Path, category: str, normals, bads) -> None:
    for i, pixels in enumerate(normals):
        _save(image_root / "normal" / f"{category} {(60, 120)[i % 2]} {1 + i % 3}_{i:03d}.png", pixels)
    for i, (kind, pixels, _) in enumerate(bads):
        _save(image_root / kind / f"{category} {(60, 120)[i % 2]} {1 + i % 3}_{i:03d}.png", pixels)


# ----------------------------------------------------------------------------- "synthetic" layout
def list_categories(root: str | os.PathLike) -> list[str]:
    """Categories already generated under ``root``, or ["widget"] when there are none."""
    root = Path(root)
    found = sorted(p.parent.name for p in root.glob(f"*/{MARKER}")) if root.is_dir() else []
    return found or ["widget"]


def index(root: str | os.PathLike, category: str, *, dataset: str | None = None, n_train: int = 8,
          n_test_good: int = 4, n_test_bad: int = 4, size: int = 64, seed: int = 0,
          defect_strength: float = 1.0) -> pd.DataFrame:
    """Generate (once) an MVTec-layout synthetic category under ``root`` and index it."""
    from adlib.data import mvtec

    params = {"n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad, "size": size, "seed": seed}
    if defect_strength != 1.0:  # categories generated before the option existed stay valid
        params["defect_strength"] = defect_strength
    ensure_category(root, category, **params)
    return mvtec.index(root, category, dataset=dataset or "synthetic")


def ensure_category(root: str | os.PathLike, category: str, **params: float) -> Path:
    """``root/category`` generated with ``params``; (re)written atomically only when needed."""
    from filelock import FileLock

    from adlib.data.files import check_name
    from adlib.data.manifest import DataError

    root, category = Path(root), check_name(category, "category")
    target, wanted = root / category, {"category": category, **params}
    if _marker(target) == wanted:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{category}.lock")):
        if _marker(target) == wanted:
            return target
        if target.exists() and _marker(target) is None:
            raise DataError(f"{target} exists and was not made by adlib.data.synthetic; refusing to "
                            "overwrite it. Use another root for synthetic data")
        tmp = Path(tempfile.mkdtemp(prefix=".generate-", dir=root))
        try:
            make_dataset("mvtec", tmp, categories=(category,), **params)
            (tmp / category / MARKER).write_text(json.dumps(wanted), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp / category, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- auxiliary sets
TEXTURE_CLASSES = ("banded", "chequered", "dotted", "marbled")
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684")


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 10)
    u = x * np.cos(angle) + y * np.sin(angle)
    w = -x * np.sin(angle) + y * np.cos(angle)
    if kind == "banded":
        value = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
    elif kind == "chequered":
        value = ((np.floor(freq * u) + np.floor(freq * w)) % 2).astype(float)
    elif kind == "dotted":
        value = (np.hypot((freq * u) % 1 - 0.5, (freq * w) % 1 - 0.5) < 0.25).astype(float)
    else:
        value = 0.5 + 0.5 * np.sin(2 * np.pi * (freq * u + 1.5 * np.sin(2 * np.pi * 2 * w)))
    low, high = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1, 3)
    pixels = low + value[..., None] * (high - low) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def make_textures(root: str | os.PathLike, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` procedural textures as ``<root>/dtd/images/<class>/<class>_NNNN.jpg``; return
    the ``images`` folder."""
    images = Path(root) / "dtd" / "images"
    rng = np.random.default_rng([seed, 1])
    for i in range(n):
        kind = TEXTURE_CLASSES[i % len(TEXTURE_CLASSES)]
        _save(images / kind / f"{kind}_{i:04d}.jpg", _texture(kind, size, rng), quality=95)
    return images


def make_imagenet_like(root: str | os.PathLike, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` colourful smooth images as ``<root>/imagenette2/train/<wnid>/*.JPEG``; return
    the ``train`` folder."""
    train = Path(root) / "imagenette2" / "train"
    rng = np.random.default_rng([seed, 2])
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        pixels = np.zeros((size, size, 3))
        for _ in range(6):  # a few soft coloured blobs on a gradient
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
            pixels += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)[..., None] * rng.uniform(0, 0.6, 3)
        pixels += (x[..., None] * rng.uniform(0, 0.3, 3)) + rng.normal(0, 0.02, pixels.shape)
        wnid = IMAGENETTE_WNIDS[i % len(IMAGENETTE_WNIDS)]
        _save(train / wnid / f"{wnid}_{i:05d}.JPEG", (np.clip(pixels, 0, 1) * 255).astype(np.uint8),
              format="JPEG", quality=90)
    return train
