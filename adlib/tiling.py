"""Tiling: train on tiles of large images and predict tile by tile, for any model that produces
maps (docs/tiling.md). Models know nothing of it; it lives here only.

A configuration is tiled when its training key ``tile_size`` is set. Then

* images keep their aspect ratio (``tile_image_size``: their own size, a long side, or exactly
  (height, width)) instead of being squashed to ``img_size`` x ``img_size``;
* training sees tiles: :class:`TileDataset` cuts ``tile_size`` squares every ``tile_stride``
  pixels from each (cached) image, the last tile of each row and column aligned to the border,
  optionally a seeded random subset of ``tiles_per_image`` per image; masks are cut alike;
* prediction goes through :class:`TiledModel`: each full image is cut into the same grid, the
  model runs on batches of tiles, and their maps are stitched back to the full image
  (``tile_blend``: the mean, the maximum, or a Gaussian-weighted mean of overlapping values);
  the image score is the maximum of the stitched map.

:func:`tiled` wraps a trained model when its configuration says so (``artifacts.load_model``
calls it), so evaluation, prediction, pixel metrics and pictures work on full images unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from adlib.data.images import ImageSize, KeepAspect, output_shape
from adlib.data.manifest import DataError
from adlib.models.base import AnomalyOutput

BLENDS = ("mean", "max", "gaussian")
#: the training keys of tiling (adlib.models.registry.TrainDefaults)
TILE_KEYS = ("tile_size", "tile_stride", "tile_blend", "tiles_per_image", "tile_image_size")
#: the smallest tile side (as for img_size)
MIN_TILE = 16
#: Gaussian blending: the window's sigma as a fraction of the tile side
GAUSSIAN_SIGMA = 0.25


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tiling_problems(train: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every bad tiling value of a resolved training configuration."""
    tile = train.get("tile_size")
    if tile is None:
        return [(key, f"{train[key]!r} has no effect without tile_size: set tile_size to tile the images")
                for key in ("tile_stride", "tiles_per_image", "tile_image_size") if train.get(key) is not None]
    if not _is_int(tile) or not MIN_TILE <= tile <= 8192:
        return [("tile_size", f"{tile!r} is not a tile side: use an integer from {MIN_TILE} to 8192")]
    out = []
    stride = train.get("tile_stride")
    if stride is not None and (not _is_int(stride) or not 1 <= stride <= tile):
        gap = (f"; tiles {stride} px apart leave gaps of {stride - tile} px that no tile covers"
               if _is_int(stride) and stride > tile else "")
        out.append(("tile_stride", f"{stride!r} is out of range: use 1 to tile_size={tile} pixels (tile_size: no "
                                   f"overlap, less: overlapping tiles){gap}"))
    if train.get("tile_blend", "mean") not in BLENDS:
        out.append(("tile_blend", f"{train.get('tile_blend')!r} is not a blending: use one of {', '.join(BLENDS)}"))
    per_image = train.get("tiles_per_image")
    if per_image is not None and (not _is_int(per_image) or per_image < 1):
        out.append(("tiles_per_image", f"{per_image!r} must be a positive number of tiles, or null for all tiles"))
    size = train.get("tile_image_size")
    if size is not None:
        sides = [size] if _is_int(size) else list(size) if isinstance(size, (list, tuple)) else []
        if not (_is_int(size) or len(sides) == 2) or not all(_is_int(s) for s in sides):
            out.append(("tile_image_size", f"{size!r} must be a long side (an integer), [height, width], or null "
                                           "for the images' own size"))
        elif min(sides) < tile:
            out.append(("tile_image_size", f"{size!r} is smaller than tile_size={tile}: every image side must hold "
                                           "at least one tile"))
    if train.get("center_crop") is not None:
        out.append(("center_crop", f"{train['center_crop']!r}: tiled runs keep the whole image; set center_crop "
                                   "to null"))
    return out


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of the tiles along one axis of ``length`` pixels: every ``stride`` pixels, plus a
    last tile aligned to the far border when the stride does not land there."""
    if tile > length:
        raise ValueError(f"a tile of {tile} px does not fit in {length} px")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a tiled configuration cuts, blends and samples tiles (its ``tile_*`` training keys)."""

    tile: int
    stride: int
    blend: str = "mean"
    per_image: int | None = None
    image_size: KeepAspect = KeepAspect()

    @classmethod
    def of(cls, train: Mapping[str, Any]) -> "Tiling | None":
        """The tiling of a training configuration; None when it is not tiled. Bad values are a
        ``ValueError`` naming every one of them."""
        problems = tiling_problems(train)
        if problems:
            raise ValueError("bad tiling: " + "; ".join(f"{key}: {message}" for key, message in problems))
        tile = train.get("tile_size")
        if tile is None:
            return None
        return cls(tile=int(tile), stride=int(train.get("tile_stride") or tile),
                   blend=str(train.get("tile_blend") or "mean"), per_image=train.get("tiles_per_image"),
                   image_size=KeepAspect.of(train.get("tile_image_size")))

    def positions(self, height: int, width: int, what: str = "an image") -> list[tuple[int, int]]:
        """Top-left corners (y, x) of the tiles covering ``height`` x ``width`` pixels, row by row."""
        if self.tile > min(height, width):
            raise ValueError(f"{what} is {height}x{width} px, smaller than tile_size={self.tile}: use a tile_size "
                             f"of at most {min(height, width)}, or keep the images larger (tile_image_size)")
        return [(y, x) for y in axis_starts(height, self.tile, self.stride)
                for x in axis_starts(width, self.tile, self.stride)]

    def window(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Weight of each tile pixel when overlapping maps are averaged (``tile x tile``, float64):
        ones for "mean", a Gaussian around the tile centre for "gaussian"."""
        if self.blend != "gaussian":
            return torch.ones(self.tile, self.tile, dtype=torch.float64, device=device)
        x = torch.arange(self.tile, dtype=torch.float64, device=device) - (self.tile - 1) / 2
        g = torch.exp(-0.5 * (x / (GAUSSIAN_SIGMA * self.tile)) ** 2)
        return g[:, None] * g[None, :]


def image_geometry(train: Mapping[str, Any]) -> tuple[ImageSize, int | None]:
    """(image size, center crop) the data layer decodes a configuration's images at: the square
    ``img_size`` (and ``center_crop``), or a tiled run's :class:`KeepAspect` size."""
    tiling = Tiling.of(train)
    if tiling is not None:
        return tiling.image_size, None
    crop = train.get("center_crop")
    return int(train["img_size"]), None if crop is None else int(crop)


def model_input_side(train: Mapping[str, Any]) -> int:
    """Side of the square images a configuration's model sees: the tile, or the crop / image size."""
    return int(train.get("tile_size") or train.get("center_crop") or train["img_size"])


def prepare_tiled_images(manifest, train: Mapping[str, Any], cache_root=None) -> None:
    """Before a tiled run trains: every image of ``manifest`` holds a tile (:func:`check_images_fit`),
    and the image cache holds all of them at the kept size, so one shard serves the training,
    validation, calibration and test images (as the prepare step's square shard serves untiled
    runs; a shard of the training images alone would be replaced by the test images' one)."""
    from adlib.data.cache import ImageCache

    tiling = Tiling.of(train)
    if tiling is None:
        return
    check_images_fit(manifest["image_path"], train)
    if cache_root is not None:
        ImageCache.build(manifest, cache_root, tiling.image_size)


def check_images_fit(image_paths: Iterable[str], train: Mapping[str, Any]) -> None:
    """Refuse a tiled configuration whose tile does not fit in some image (file headers only)."""
    tiling = Tiling.of(train)
    if tiling is None:
        return
    shapes = {path: output_shape(path, tiling.image_size) for path in map(str, image_paths)}
    small = [(path, shape) for path, shape in shapes.items() if min(shape) < tiling.tile]
    if small:
        listed = ", ".join(f"{path} ({h}x{w} px)" for path, (h, w) in small[:3])
        smallest = min(min(shape) for _, shape in small)
        raise DataError(f"tile_size={tiling.tile} is larger than {len(small)} image(s) at the tiled image size "
                        f"({tiling.image_size.label}): {listed}{' ...' if len(small) > 3 else ''}. Use a tile_size "
                        f"of at most {smallest}, or keep the images larger (tile_image_size)")


class TileDataset(Dataset):
    """The tiles of an :class:`~adlib.data.ImageDataset`'s images as items of the same kind.

    Each item is one ``tile x tile`` square of one image (and of its mask); ``index`` is the
    image's row. A tile's label is whether its mask has a defect pixel; for an anomalous image
    without a mask (the defect's place is unknown) every tile keeps the image's label.
    ``tiling.per_image`` keeps a random subset of each image's tiles, drawn once with ``seed``.
    Pixels come from the image cache when the data set has one (never decoded again).
    """

    def __init__(self, images, tiling: Tiling, seed: int = 0) -> None:
        self.images = images
        self.tiling = tiling
        self.manifest = images.manifest
        rng = np.random.default_rng(seed)
        self.tiles: list[tuple[int, int, int]] = []  # (image row, y, x)
        for row in range(len(images)):
            grid = tiling.positions(*images.shape(row), what=f"image {self.manifest['image_path'].iloc[row]}")
            if tiling.per_image is not None and tiling.per_image < len(grid):
                grid = [grid[k] for k in np.sort(rng.choice(len(grid), tiling.per_image, replace=False))]
            self.tiles += [(row, y, x) for y, x in grid]
        labels = self.manifest["label"].astype(int).to_numpy()
        #: anomalous images with a mask: their tiles are labelled by the mask
        self._masked = {row for row in np.flatnonzero(labels == 1) if images.raw(row)[1].any()}

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict:
        row, y, x = self.tiles[index]
        pixels, mask = self.images.raw(row)
        t = self.tiling.tile
        tile_mask = mask[y:y + t, x:x + t]
        label = int(tile_mask.any()) if row in self._masked else None
        return self.images.item(row, pixels[y:y + t, x:x + t], tile_mask, label=label)


class TiledModel(nn.Module):
    """A trained model applied tile by tile to full images (see the module docstring).

    ``batch_size`` tiles go through the model at once. ``predict`` takes ``B x 3 x H x W``
    images (any H, W that hold a tile) and returns maps at that size and their maxima as scores.
    """

    produces_maps = True
    #: a model's own decision statistic is per tile, not stitched: tiled runs use fitted thresholds
    decision_method = None

    def __init__(self, model: nn.Module, tiling: Tiling, batch_size: int = 32) -> None:
        if not getattr(model, "produces_maps", False):
            raise ValueError(f"{type(model).__name__} scores whole images only (no anomaly maps), so it cannot be "
                             "tiled: tile maps are what is stitched. Drop tile_size, or choose a model that "
                             "produces maps")
        super().__init__()
        self.model = model
        self.tiling = tiling
        self.batch_size = int(batch_size)
        self.config = getattr(model, "config", None)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        b, _, h, w = images.shape
        t = self.tiling.tile
        positions = self.tiling.positions(h, w, what=f"an image of {h}x{w} px")
        use_max = self.tiling.blend == "max"
        total = torch.full((b, h, w), -torch.inf if use_max else 0.0, dtype=torch.float64, device=images.device)
        weight = torch.zeros(h, w, dtype=torch.float64, device=images.device)
        window = self.tiling.window(images.device)
        per_call = max(1, self.batch_size // b)
        for first in range(0, len(positions), per_call):
            chunk = positions[first:first + per_call]
            tiles = torch.stack([images[:, :, y:y + t, x:x + t] for y, x in chunk], dim=1).flatten(0, 1)
            maps = self.model.predict(tiles).maps
            if maps is None or tuple(maps.shape) != (len(tiles), t, t):
                raise ValueError(f"{type(self.model).__name__}.predict returned maps of shape "
                                 f"{None if maps is None else tuple(maps.shape)} for {len(tiles)} tiles of {t} px; "
                                 f"tiling needs one map per tile at input size")
            maps = maps.reshape(b, len(chunk), t, t).double()
            for k, (y, x) in enumerate(chunk):
                target = total[:, y:y + t, x:x + t]
                if use_max:
                    target.copy_(torch.maximum(target, maps[:, k]))
                else:
                    target += maps[:, k] * window
                    weight[y:y + t, x:x + t] += window
        stitched = (total if use_max else total / weight).float()
        return AnomalyOutput(scores=stitched.flatten(1).amax(dim=1), maps=stitched)

    def saved_state(self) -> dict[str, torch.Tensor]:
        return self.model.saved_state()

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_saved_state(state)

    def num_parameters(self) -> int:
        return self.model.num_parameters()


def tiled(model: nn.Module, train: Mapping[str, Any]) -> nn.Module:
    """``model`` wrapped in a :class:`TiledModel` when the training configuration is tiled."""
    tiling = Tiling.of(train)
    return model if tiling is None else TiledModel(model, tiling, batch_size=int(train["batch_size"]))
