"""Decoding one sample: the single place where image and mask files become arrays.

Both :class:`~adlib.data.dataset.ImageDataset` and :class:`~adlib.data.cache.ImageCache` call
:func:`load_sample`, so cached and uncached samples are identical.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from adlib.data.manifest import DataError, DataWarning

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(path: str) -> Image.Image:
    """Decode an image file as RGB (grayscale and palette images are converted)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist (any more); re-index the data set") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}. The file is corrupt or truncated: replace "
                        "it with a good copy, or delete it and re-index the data set") from None


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
        raise DataError(f"mask {path} does not exist (any more); re-index the data set") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode mask {path}: {exc}. Replace it with a good copy") from None
    binary = Image.fromarray(((values > 0) * 255).astype(np.uint8))
    if binary.size != size:
        warnings.warn(f"mask {path} is {binary.size[0]}x{binary.size[1]} but its image is "
                      f"{size[0]}x{size[1]}; resizing the mask (nearest neighbour)", DataWarning, stacklevel=2)
        binary = binary.resize(size, Image.NEAREST)
    return binary


def resize_crop(image: Image.Image, img_size: int, center_crop: int | None, resample: int) -> Image.Image:
    """Resize to ``img_size`` x ``img_size``, then optionally cut the central ``center_crop`` square."""
    image = image.resize((img_size, img_size), resample)
    if center_crop is not None:
        if not 0 < center_crop <= img_size:
            raise ValueError(f"center_crop must be in (0, img_size={img_size}], got {center_crop}")
        left = (img_size - center_crop) // 2
        image = image.crop((left, left, left + center_crop, left + center_crop))
    return image


def load_sample(image_path: str, mask_path: str, img_size: int,
                center_crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded, resized sample: uint8 image ``S x S x 3`` and uint8 mask ``S x S`` in {0, 1}
    (zeros when ``mask_path`` is ""); ``S`` is ``center_crop`` or ``img_size``."""
    image = read_image(image_path)
    pixels = np.asarray(resize_crop(image, img_size, center_crop, Image.BILINEAR), dtype=np.uint8)
    if mask_path:
        mask = resize_crop(read_mask(mask_path, image.size), img_size, center_crop, Image.NEAREST)
        mask_values = (np.asarray(mask) > 0).astype(np.uint8)
    else:
        mask_values = np.zeros(pixels.shape[:2], dtype=np.uint8)
    return pixels, mask_values
