"""Auxiliary image sets some models need, found under the data root; never downloaded.

* Textures for DRAEM/DSR-style anomaly synthesis, DTD layout: ``<data_root>/dtd/images/<class>/*.jpg``
  (Cimpoi et al., "Describing Textures in the Wild", CVPR 2014).
* ImageNet-like images for EfficientAD's penalty loss, Imagenette layout:
  ``<data_root>/imagenette2/train/<wnid>/*.JPEG`` (``imagenette2-320``/``-160`` work too).
"""
from __future__ import annotations

import os
from pathlib import Path

from adlib.data.files import is_image
from adlib.data.manifest import DataError


def list_aux_images(directory: str | os.PathLike) -> list[Path]:
    """Every image in the class folders of ``directory``, sorted."""
    return sorted(_images_in_classes(Path(directory)))


def resolve_texture_dir(path: str | os.PathLike) -> Path:
    """The DTD ``images`` folder, given the data root, the ``dtd`` folder or ``images`` itself."""
    path = Path(path).expanduser()
    return _first_with_images(
        [path / "dtd" / "images", path / "images", path],
        what="DTD texture images (<class>/*.jpg)",
        fix=("download the Describable Textures Dataset (https://www.robots.ox.ac.uk/~vgg/data/dtd/, "
             "dtd-r1.0.1.tar.gz) on a connected machine and unpack it so that "
             f"{path / 'dtd' / 'images' / 'banded' / 'banded_0002.jpg'} exists"))


def resolve_imagenet_dir(path: str | os.PathLike) -> Path:
    """The Imagenette ``train`` folder, given the data root, the ``imagenette2`` folder or ``train``."""
    path = Path(path).expanduser()
    candidates = [path / name / "train" for name in ("imagenette2", "imagenette2-320", "imagenette2-160")]
    return _first_with_images(
        candidates + [path / "train", path],
        what="ImageNet-like images (<wnid>/*.JPEG, Imagenette layout)",
        fix=("download Imagenette (https://github.com/fastai/imagenette, imagenette2.tgz) on a connected "
             "machine and unpack it so that "
             f"{path / 'imagenette2' / 'train' / 'n01440764'} holds JPEG files (or ImageNet's train folder; "
             f"any natural photos in class sub-folders of {path / 'imagenette2' / 'train'} work)"))


def _first_with_images(candidates: list[Path], what: str, fix: str) -> Path:
    for candidate in candidates:
        if candidate.is_dir() and any(True for _ in _images_in_classes(candidate)):
            return Path(os.path.abspath(candidate))
    looked = "\n  ".join(f"{c} ({_why_not(c)})" for c in candidates)
    raise DataError(f"no {what} found; looked in:\n  {looked}\nTo fix: {fix}")


def _why_not(folder: Path) -> str:
    """Why ``folder`` is not an auxiliary image folder (for the error message)."""
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "not a folder"
    loose = sum(1 for p in folder.iterdir() if p.is_file() and is_image(p))
    if loose:
        return f"{loose} images directly inside but none in class sub-folders: move them into one, e.g. {folder / 'misc'}"
    return "no images in class sub-folders"


def _images_in_classes(directory: Path):
    for sub in directory.iterdir():
        if sub.is_dir():
            for p in sub.iterdir():
                if p.is_file() and is_image(p):
                    yield p


#: auxiliary source name (``AuxStream.source``) -> resolver of its folder under the data root
SOURCES = {"textures": resolve_texture_dir, "imagenet": resolve_imagenet_dir}


def resolve_aux_source(source: str, data_root: str | os.PathLike) -> Path:
    """The folder of auxiliary ``source`` under ``data_root`` (a :class:`DataError` says what to put where)."""
    if source not in SOURCES:
        raise DataError(f"unknown auxiliary source {source!r}; known sources: {', '.join(sorted(SOURCES))}")
    return SOURCES[source](data_root)


class AuxiliaryImages:
    """The images of an auxiliary folder as a map-style data set of ``[3, S, S]`` tensors in [0, 1]."""

    def __init__(self, folder: str | os.PathLike, size: int) -> None:
        self.folder, self.size = Path(folder), int(size)
        self.files = list_aux_images(self.folder)
        if not self.files:
            raise DataError(f"the auxiliary folder {self.folder} holds no images in class sub-folders "
                            "(<folder>/<class>/<image>)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import numpy as np
        import torch
        from PIL import Image

        from adlib.data.images import read_image

        image = read_image(str(self.files[index])).resize((self.size, self.size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy(np.ascontiguousarray(pixels))


def endless_batches(images: AuxiliaryImages, batch_size: int, seed: int, num_workers: int = 0):
    """Random batches of ``images`` for ever (drawn with replacement, seeded)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    generator = torch.Generator().manual_seed(int(seed))
    sampler = RandomSampler(images, replacement=True, num_samples=max(batch_size, 1) * 1024, generator=generator)
    loader = DataLoader(images, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    while True:
        yield from loader
