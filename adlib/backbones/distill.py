"""Distil an EfficientAD teacher offline: `adlib backbones distill-teacher`.

EfficientAD's PDN teacher (Batzner et al., WACV 2024, Sec. 3.1) is pretrained to reproduce, at
every position of its 64x64 map of a 256 px image, the locally aggregated features of a large
pretrained backbone (the paper: WideResNet-101 layers 2 and 3, as in PatchCore) computed on the
same image at 512 px. This module does that from any backbone the offline catalog resolves
(backbone directory or pip weight package) on any folder of natural images:

* target: for each layer, the 3x3 neighbourhood of every position (``C * 9`` values),
  average-pooled along that vector to ``pool_dim`` values; the layers (deeper ones bilinearly
  resized to the first layer's grid) stacked and average-pooled to the teacher's 384 channels,
  then standardised per channel with statistics over ``norm_images`` images. The pooling is
  linear, so it runs as one fixed 3x3 convolution per layer;
* the PDN (with the paper's padding, so its map matches the backbone's stride-8 grid at twice
  the resolution) minimises the mean squared difference; Adam, random grayscale on both views.

The result is a safetensors file under the catalog name (``efficientad_teacher_small`` ...)
with the distillation record in its metadata (and a ``.provenance.json`` beside it).
Checkpoints every ``checkpoint_every`` steps (and on Ctrl-C or SIGTERM) make a run resumable: the same
command continues where it stopped, with the same images in the same order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adlib.models.base import IMAGENET_MEAN, IMAGENET_STD
from adlib.models.components.color import grayscale_where
from adlib.backbones.distill_config import DistillConfig, DistillError
from adlib.models.components.pdn import TEACHER_RECORD_KEY, PatchDescriptionNetwork, seeded, teacher_name

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "adlib-teacher-distillation-checkpoint-1"
# ----- images ------------------------------------------------------------------------------------
def list_images(folder: str | Path) -> list[Path]:
    """Every image file below ``folder`` (any depth, linked folders too), sorted; a DistillError names an
    empty folder."""
    from adlib.data.files import is_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DistillError(f"image folder {root} {'is not a directory' if root.exists() else 'does not exist'}: "
                           "give a folder of natural images (e.g. ImageNet or Imagenette train images)")
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):  # linked folders count (each once)
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / name for name in names if is_image(Path(name))]
    files.sort()
    if not files:
        raise DistillError(f"image folder {root} holds no images (.png, .jpg, .jpeg, .bmp, .tif): give a folder "
                           "of natural images (e.g. ImageNet or Imagenette train images)")
    return files


def fingerprint(root: Path, files: Sequence[Path]) -> str:
    """Short hash of the image list (relative names and sizes): a resumed run must see the same images."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def image_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start + count`` of an endless sequence of seeded permutations of ``range(n)``."""
    out = []
    for position in range(start, start + count):
        epoch, index = divmod(position, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[index]))
    return out


def load_views(paths: Sequence[Path], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image at ``2 * side`` (backbone view) and ``side`` (PDN view), in [0, 1]."""
    from PIL import Image

    from adlib.data.images import read_image

    big, small = [], []
    for path in paths:
        image = read_image(str(path))
        for views, s in ((big, 2 * side), (small, side)):
            pixels = np.asarray(image.resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
            views.append(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
    return torch.stack(big), torch.stack(small)


# ----- the target -------------------------------------------------------------------------------
def adaptive_pool_matrix(length: int, size: int) -> torch.Tensor:
    """``[size, length]`` matrix of 1-D adaptive average pooling (PyTorch's bins)."""
    matrix = torch.zeros(size, length, dtype=torch.float64)
    for j in range(size):
        start, end = (j * length) // size, -((-(j + 1) * length) // size)
        matrix[j, start:end] = 1.0 / (end - start)
    return matrix


def patch_kernels(channels: Sequence[int], pool_dim: int, out_channels: int) -> list[torch.Tensor]:
    """Per layer the ``[out, C, 3, 3]`` kernel of: 3x3 neighbourhood (``C * 9`` values, channel-major),
    pooled to ``pool_dim``, layers stacked, pooled to ``out_channels``. Linear, hence a convolution."""
    final = adaptive_pool_matrix(len(channels) * pool_dim, out_channels)
    kernels = []
    for layer, c in enumerate(channels):
        block = final[:, layer * pool_dim:(layer + 1) * pool_dim] @ adaptive_pool_matrix(9 * c, pool_dim)
        kernels.append(block.float().view(out_channels, c, 3, 3))
    return kernels


class TargetFeatures(nn.Module):
    """The distillation target of images at twice the PDN's side: ``[B, out, grid, grid]``, raw."""

    def __init__(self, source: str, layers: Sequence[str], pool_dim: int, out_channels: int, *, pretrained: bool,
                 backbone_dir: str | Path | None) -> None:
        super().__init__()
        from adlib.backbones.extractor import FeatureExtractor

        self.extractor = FeatureExtractor(source, list(layers), pretrained=pretrained, backbone_dir=backbone_dir)
        reductions = self.extractor.reductions
        if reductions[0] != 8 or sorted(reductions) != list(reductions):
            raise DistillError(f"the first layer must have stride 8 (at twice the PDN's input side its grid is the "
                               f"PDN's map) and the others be as deep or deeper; {source} layers {list(layers)} have "
                               f"strides {reductions}. "
                               "Use e.g. --layers layer2 layer3")
        for i, kernel in enumerate(patch_kernels(self.extractor.channels, pool_dim, out_channels)):
            self.register_buffer(f"kernel{i}", kernel)
        self.register_buffer("_mean", torch.tensor(self.extractor.mean).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(self.extractor.std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.extractor((images - self._mean) / self._std)
        grid = feats[0].shape[-2:]
        out = None
        for i, feat in enumerate(feats):
            part = F.conv2d(feat, getattr(self, f"kernel{i}"), padding=1)
            if part.shape[-2:] != grid:
                part = F.interpolate(part, size=grid, mode="bilinear", align_corners=False)
            out = part if out is None else out + part
        return out


# ----- the run -----------------------------------------------------------------------------------
def default_output(backbone_dir: str | Path, size: str) -> Path:
    """Where the catalog looks for a distilled teacher: ``<backbone_dir>/<catalog name>.safetensors``."""
    return Path(backbone_dir) / f"{teacher_name(size)}.safetensors"


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoint")


def provenance_path(output: Path) -> Path:
    return output.with_name(output.stem + ".provenance.json")


def distill_teacher(config: DistillConfig, output: str | Path, *, backbone_dir: str | Path | None,
                    device: str | torch.device = "cpu", force: bool = False, progress: bool = True,
                    pretrained_source: bool = True) -> Path:
    """Run (or resume) a distillation and write the teacher file; returns its path.

    ``pretrained_source=False`` distils from a random-init backbone: for tests only, and the
    record says so.
    """
    output = Path(output)
    if output.exists() and not force:
        raise DistillError(f"{output} exists; pass --force to replace it")
    if output.suffix != ".safetensors":
        raise DistillError(f"the teacher is written as safetensors: name the output *.safetensors, not {output}")
    root = Path(config.images).expanduser().resolve()
    files = list_images(root)
    prints = fingerprint(root, files)
    device = torch.device(device)
    checkpoint = _read_checkpoint(checkpoint_path(output), config, prints)

    target = TargetFeatures(config.source, config.layers, config.pool_dim, config.out_channels,
                            pretrained=pretrained_source, backbone_dir=backbone_dir).to(device)
    pdn = seeded(lambda: PatchDescriptionNetwork(config.size, config.out_channels, padding=True), config.seed)
    pdn.to(device=device, memory_format=torch.channels_last)  # oneDNN's faster layout (~20 % per step on a CPU)
    _check_grids(target, pdn, config.img_size, device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if checkpoint is not None:
        pdn.load_state_dict(checkpoint["pdn"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        mean, std, start = checkpoint["target_mean"].to(device), checkpoint["target_std"].to(device), checkpoint["step"]
        log.info("resuming the distillation from %s at step %d", checkpoint_path(output), start)
    else:
        mean, std = _target_statistics(target, files, config, device, progress)
        start = 0
    state = _Run(config, files, target, pdn, optimizer, mean, std, device, output)
    loss = state.train(start, progress)
    record = {"format": "adlib-efficientad-teacher", "model_size": config.size, "out_channels": config.out_channels,
              "source_backbone": config.source, "source_layers": list(config.layers),
              "source_weights": target.extractor.weights_provenance,
              "images": {"folder": str(root), "count": len(files), "fingerprint": prints},
              "steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
              "weight_decay": config.weight_decay, "img_size": config.img_size, "pool_dim": config.pool_dim,
              "norm_images": min(config.norm_images, len(files)), "grayscale": config.grayscale, "seed": config.seed,
              "final_loss": loss, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not pretrained_source:
        record["warning"] = "distilled from a RANDOM-init backbone (tests only): not a usable teacher"
    _write_teacher(output, pdn, record)
    checkpoint_path(output).unlink(missing_ok=True)
    return output


def _check_grids(target: TargetFeatures, pdn: PatchDescriptionNetwork, side: int, device: torch.device) -> None:
    grid = target(torch.zeros(1, 3, 2 * side, 2 * side, device=device)).shape[-1]
    if grid != pdn.output_side(side):
        raise DistillError(f"the backbone's feature grid at {2 * side} px ({grid}) differs from the PDN's map at "
                           f"{side} px ({pdn.output_side(side)}): choose a first layer of stride 8")


def _normalize_pdn_input(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _target_statistics(target: TargetFeatures, files: list[Path], config: DistillConfig, device: torch.device,
                       progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std of the raw target over ``norm_images`` images (float64 sums)."""
    from tqdm.auto import tqdm

    count = min(config.norm_images, len(files))
    order = image_order(len(files), config.seed, 0, count)
    sums = torch.zeros(3, config.out_channels, dtype=torch.float64, device=device)
    for start in tqdm(range(0, count, config.batch_size), desc="target statistics", disable=not progress,
                      leave=False):
        big, _ = load_views([files[i] for i in order[start:start + config.batch_size]], config.img_size)
        out = target(big.to(device)).double()
        sums += torch.stack([torch.full_like(out[0, :, 0, 0], out[:, 0].numel()), out.sum((0, 2, 3)),
                             out.square().sum((0, 2, 3))])
    mean = sums[1] / sums[0]
    std = (sums[2] / sums[0] - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


@dataclasses.dataclass
class _Run:
    config: DistillConfig
    files: list[Path]
    target: TargetFeatures
    pdn: PatchDescriptionNetwork
    optimizer: torch.optim.Optimizer
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    output: Path

    def train(self, start: int, progress: bool) -> float | None:
        """Steps ``start .. config.steps``; a checkpoint every ``checkpoint_every`` steps and on Ctrl-C
        or SIGTERM (a batch system's notice)."""
        from tqdm.auto import tqdm

        cfg = self.config
        loss = None
        step = start
        bar = tqdm(total=cfg.steps, initial=start, desc=f"distil PDN-{cfg.size[0].upper()} from {cfg.source}",
                   disable=not progress)
        self.pdn.train()
        try:
            with _sigterm_interrupts():
                for step in range(start, cfg.steps):
                    loss = distill_step(self, step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                        self.save_checkpoint(step + 1, loss)
        except KeyboardInterrupt:
            self.save_checkpoint(step, loss)
            log.warning("distillation interrupted at step %d; checkpoint %s: run the same command to resume",
                        step, checkpoint_path(self.output))
            raise
        finally:
            bar.close()
        return loss

    def save_checkpoint(self, step: int, loss: float | None) -> None:
        from adlib.io import atomic_path

        payload = {"format": CHECKPOINT_FORMAT, "config": json.dumps(self.config.comparable(), sort_keys=True),
                   "fingerprint": fingerprint(Path(self.config.images).expanduser().resolve(), self.files),
                   "step": int(step), "loss": float("nan") if loss is None else float(loss),
                   "pdn": {k: v.detach().cpu() for k, v in self.pdn.state_dict().items()},
                   "optimizer": self.optimizer.state_dict(), "target_mean": self.mean.cpu(),
                   "target_std": self.std.cpu()}
        with atomic_path(checkpoint_path(self.output)) as tmp:
            torch.save(payload, tmp)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt meanwhile (main thread only), so it leaves a checkpoint too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def distill_step(run: _Run, step: int) -> float:
    """One optimiser step on the images of position ``step`` (the same images whenever it runs)."""
    cfg = run.config
    paths = [run.files[i] for i in image_order(len(run.files), cfg.seed, step * cfg.batch_size, cfg.batch_size)]
    big, small = load_views(paths, cfg.img_size)
    flip = torch.from_numpy(np.random.default_rng([cfg.seed, step]).random(len(paths)) < cfg.grayscale)
    big, small = big.to(run.device), small.to(run.device)
    with torch.no_grad():
        goal = (run.target(grayscale_where(big, flip)) - run.mean) / run.std
    inputs = _normalize_pdn_input(grayscale_where(small, flip)).contiguous(memory_format=torch.channels_last)
    prediction = run.pdn(inputs)
    loss = (prediction - goal).square().mean()
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return float(loss.detach())


def _read_checkpoint(path: Path, config: DistillConfig, prints: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickled objects ...
        raise DistillError(f"cannot read the checkpoint {path} ({type(exc).__name__}): delete it to start "
                           "over") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{path} is not a distillation checkpoint of this adlib version: delete it to start over")
    saved = json.loads(checkpoint["config"])
    changed = {k: (saved.get(k), v) for k, v in config.comparable().items() if _plain(saved.get(k)) != _plain(v)}
    if changed or checkpoint["fingerprint"] != prints:
        what = (", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
                or "the image folder's files")
        raise DistillError(f"the checkpoint {path} was made with other settings ({what}). Rerun with the same "
                           "settings to resume, or delete the checkpoint to start over.")
    if checkpoint["step"] >= config.steps:
        raise DistillError(f"the checkpoint {path} is at step {checkpoint['step']}, not before --steps "
                           f"{config.steps}: give more steps to continue, or delete it to start over")
    return checkpoint


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _write_teacher(output: Path, pdn: PatchDescriptionNetwork, record: dict) -> None:
    from safetensors.torch import save_file

    from adlib.io import atomic_path, write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in pdn.state_dict().items()}
    with atomic_path(output) as tmp:
        save_file(state, str(tmp), metadata={TEACHER_RECORD_KEY: json.dumps(record, default=str)})
    write_json(provenance_path(output), record)
