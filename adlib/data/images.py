"""Decoding one sample: the single place where image and mask files become arrays.

Both :class:`~adlib.data.dataset.ImageDataset` and :class:`~adlib.data.cache.ImageCache` call
:func:`load_sample`, so cached and uncached samples are identical.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

from adlib.data.manifest import DataError, DataWarning

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Pillow modes that ``Image.convert("RGB")`` maps correctly (8 bits per channel, palette, bilevel)
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"}


def _bit_depth(image: Image.Image, values: np.ndarray) -> int:
    """Bits per sample of an integer image: the TIFF tag when present, else the container
    (16 for ``I;16*``), else the smallest of 8/16/32 that holds the values."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    if image.mode.startswith("I;16"):
        return 16
    peak = int(values.max()) if values.size else 0
    return 8 if peak <= 255 else 16 if peak <= 65535 else 32


def to_rgb8(image: Image.Image, path: str) -> Image.Image:
    """An RGB image with 8 bits per channel, intensities scaled by the file's real bit depth
    (16-bit grey from industrial cameras is divided by 65535, not clipped at 255; float images
    are read as intensities in [0, 1])."""
    if image.mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        if values.size and values.min() < 0:
            raise DataError(f"cannot decode image {path}: signed integer pixels (min {values.min():g}); save it "
                            "as unsigned 8- or 16-bit")
        scaled = values / (2 ** _bit_depth(image, values) - 1)
    elif image.mode == "F":
        scaled = np.asarray(image).astype(np.float64)
        if not np.isfinite(scaled).all() or (scaled.size and (scaled.min() < 0 or scaled.max() > 1)):
            raise DataError(f"cannot decode image {path}: floating-point pixels must be intensities in [0, 1] "
                            f"(found {np.nanmin(scaled):g} .. {np.nanmax(scaled):g}); rescale it or save it as "
                            "8/16-bit integers")
    else:
        raise DataError(f"cannot decode image {path}: pixel mode {image.mode!r} is not supported; save it as 8- or "
                        "16-bit grey or RGB (PNG, TIFF, JPEG, BMP)")
    grey = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


#: what to do when the indexed files changed on disk
REINDEX = ("index the data set again (the workflow re-prepares changed data on its next run; force it with "
           "`snakemake --forcerun prepare`)")


def read_image(path: str) -> Image.Image:
    """Decode an image file as 8-bit RGB (grey, palette, 16-bit and float images are converted;
    see :func:`to_rgb8`)."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb8(image, path)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist (any more); {REINDEX}") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}. The file is corrupt or truncated: replace "
                        f"it with a good copy, or delete it and {REINDEX}") from None


def read_mask(path: str, size: tuple[int, int]) -> Image.Image:
    """Decode a mask as a 0/255 "L" image of ``size`` (width, height); any value > 0 is a defect.

    A mask whose size differs from its image is resized (nearest) with a :class:`DataWarning`.
    """
    try:
        with Image.open(path) as mask:
            mask.load()
            if mask.mode in {"1", "L", "P", "I", "I;16", "F"}:
                values = np.asarray(mask)
            else:  # colour masks: a pixel is a defect when any colour channel is non-zero
                values = np.asarray(mask.convert("RGB")).max(axis=-1)
    except FileNotFoundError:
        raise DataError(f"mask {path} does not exist (any more); {REINDEX}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode mask {path}: {exc}. Replace it with a good copy") from None
    binary = Image.fromarray(((values > 0) * 255).astype(np.uint8))
    if binary.size != size:
        warnings.warn(f"mask {path} is {binary.size[0]}x{binary.size[1]} but its image is "
                      f"{size[0]}x{size[1]}; resizing the mask (nearest neighbour)", DataWarning, stacklevel=2)
        binary = binary.resize(size, Image.NEAREST)
    return binary


@dataclasses.dataclass(frozen=True)
class KeepAspect:
    """The size of images that are not squashed to a square (tiled runs, docs/tiling.md): their
    own size (no field set), scaled so the long side is ``long_side``, or exactly ``shape``
    (height, width)."""

    long_side: int | None = None
    shape: tuple[int, int] | None = None

    @classmethod
    def of(cls, value: int | Sequence[int] | None) -> "KeepAspect":
        """From the ``tile_image_size`` option: None, a long side, or (height, width)."""
        if value is None:
            return cls()
        if isinstance(value, int):
            return cls(long_side=int(value))
        height, width = (int(v) for v in value)
        return cls(shape=(height, width))

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of ``width`` x ``height`` pixels is resized to."""
        if self.shape is not None:
            return self.shape[1], self.shape[0]
        if self.long_side is None:
            return width, height
        scale = self.long_side / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    @property
    def label(self) -> str:
        """Short name of this size (cache folders): ``full``, ``long512``, ``512x1024``."""
        if self.shape is not None:
            return f"{self.shape[0]}x{self.shape[1]}"
        return "full" if self.long_side is None else f"long{self.long_side}"

    def to_json(self) -> dict:
        return {"long_side": self.long_side, "shape": None if self.shape is None else list(self.shape)}


#: what an image is resized to: a square side (``img_size``), or a :class:`KeepAspect` size
ImageSize = int | KeepAspect


def output_shape(image_path: str, img_size: ImageSize, center_crop: int | None = None) -> tuple[int, int]:
    """(height, width) of the decoded sample of ``image_path``, from the file header alone."""
    if not isinstance(img_size, KeepAspect):
        side = center_crop or img_size
        return side, side
    try:
        with Image.open(image_path) as image:
            width, height = img_size.target(*image.size)
    except FileNotFoundError:
        raise DataError(f"image {image_path} does not exist (any more); index the data set again") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read the size of image {image_path}: {exc}. Replace it with a good copy") from None
    return height, width


def resize_crop(image: Image.Image, img_size: ImageSize, center_crop: int | None, resample: int) -> Image.Image:
    """Resize to ``img_size`` x ``img_size``, then optionally cut the central ``center_crop`` square;
    or, for a :class:`KeepAspect` size, resize to its target (never cropped)."""
    if isinstance(img_size, KeepAspect):
        if center_crop is not None:
            raise ValueError(f"center_crop={center_crop} cannot be combined with a {img_size.label} image size; "
                             "images kept at their aspect ratio are never cropped")
        size = img_size.target(*image.size)
        return image if size == image.size else image.resize(size, resample)
    image = image.resize((img_size, img_size), resample)
    if center_crop is not None:
        if not 0 < center_crop <= img_size:
            raise ValueError(f"center_crop must be in (0, img_size={img_size}], got {center_crop}")
        left = (img_size - center_crop) // 2
        image = image.crop((left, left, left + center_crop, left + center_crop))
    return image


def load_sample(image_path: str, mask_path: str, img_size: ImageSize,
                center_crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded, resized sample: uint8 image ``S x S x 3`` and uint8 mask ``S x S`` in {0, 1}
    (zeros when ``mask_path`` is ""); ``S`` is ``center_crop`` or ``img_size``. With a
    :class:`KeepAspect` size the sample is ``H x W`` (see :func:`output_shape`)."""
    image = read_image(image_path)
    pixels = np.asarray(resize_crop(image, img_size, center_crop, Image.BILINEAR), dtype=np.uint8)
    if mask_path:
        mask = resize_crop(read_mask(mask_path, image.size), img_size, center_crop, Image.NEAREST)
        mask_values = (np.asarray(mask) > 0).astype(np.uint8)
    else:
        mask_values = np.zeros(pixels.shape[:2], dtype=np.uint8)
    return pixels, mask_values
