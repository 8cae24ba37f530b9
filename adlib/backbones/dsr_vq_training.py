"""DSR's stage 1, offline: train the general appearance (VQ) model on any folder of images.

The authors trained their discrete latent model on ImageNet and released it as a file that cannot
be downloaded here. This trains the same architecture (:class:`~adlib.models.components.vq.
GeneralAppearanceModel`) on whatever images are at hand (natural images generalise best; normal
images of the target objects also work) and writes ``<backbone_dir>/dsr_vq_model.safetensors``,
which the catalog finds for ``dsr``.

Training: random square crops (shorter side resized to the crop side, random horizontal flips) of
the images; loss ``MSE(reconstruction, image) + commitment * (|z_lo - sg(q_lo)|^2 + |z_hi - sg(q_hi)|^2)``
with Adam; both codebooks follow exponential moving averages of their assigned features. The
codebooks start from features of the first batch and codes left unused (EMA usage below
``dead_code_threshold``) are moved onto random current features, so brief trainings on small
folders still use the codebook.

Resumable: every ``checkpoint_every`` steps the model, optimiser, step and random state go to a
checkpoint (tensors and plain values only, read back with ``torch.load(weights_only=True)``); a
new call with the same settings continues from it. Provenance: the output's safetensors metadata
and a ``.json`` record beside it say what it was trained on and how.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adlib.backbones.dsr_vq_config import VqTrainingConfig

log = logging.getLogger(__name__)

#: format tag in the output's metadata and provenance record
FORMAT = "adlib-dsr-vq-v1"
#: decoded training images kept in memory at most (larger folders are decoded per step)
_CACHE_LIMIT_BYTES = 1 << 30




class CropSampler:
    """Seeded random crops of a list of image files (decoded once and kept when they fit in memory)."""

    def __init__(self, paths: Sequence[Path], side: int, generator: torch.Generator) -> None:
        self.paths, self.side, self.generator = list(paths), int(side), generator
        self.keep = len(self.paths) * 4 * side * side * 3 <= _CACHE_LIMIT_BYTES
        self._cache: dict[int, np.ndarray] = {}

    def _image(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        from PIL import Image

        from adlib.data.images import read_image

        image = read_image(str(self.paths[i]))
        scale = self.side / min(image.size)
        size = (max(self.side, round(image.size[0] * scale)), max(self.side, round(image.size[1] * scale)))
        array = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.uint8)
        if self.keep:
            self._cache[i] = array
        return array

    def batch(self, n: int) -> torch.Tensor:
        """``[n, 3, side, side]`` crops in [0, 1]."""
        g, s = self.generator, self.side
        out = torch.empty(n, 3, s, s)
        for k in range(n):
            image = self._image(int(torch.randint(len(self.paths), (1,), generator=g)))
            h, w = image.shape[:2]
            y = int(torch.randint(h - s + 1, (1,), generator=g))
            x = int(torch.randint(w - s + 1, (1,), generator=g))
            crop = torch.from_numpy(image[y:y + s, x:x + s].copy()).permute(2, 0, 1).float() / 255.0
            out[k] = crop.flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else crop
        return out


def _file_list_digest(paths: Sequence[Path]) -> str:
    return hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()


def _save_atomically(obj: Any, path: Path) -> None:
    from adlib.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path, config: VqTrainingConfig, digest: str) -> dict[str, Any] | None:
    """The checkpoint's contents when it belongs to this run; None when there is none."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it or pass "
                         "--fresh to start over") from exc
    saved = VqTrainingConfig(**state["config"])
    if not saved.resumable_with(config) or state.get("images_digest") != digest:
        raise ValueError(f"checkpoint {path} belongs to another training (settings {state['config']}, other "
                         "images): pass --fresh to start over, or another --checkpoint path")
    return state


def _init_codebooks(model, x: torch.Tensor, generator: torch.Generator) -> None:
    """Both codebooks start on random features of the first batch (without an EMA step)."""
    quantizers = (model.quant_lo, model.quant_hi)
    for quantizer in quantizers:
        quantizer.ema_update = False
    with torch.no_grad():
        enc_hi, z_lo = model.encode_lo(x)
        model.quant_lo.restart_dead_codes(z_lo, generator, float("inf"))
        q_lo, _, _ = model.quant_lo(z_lo)
        model.quant_hi.restart_dead_codes(model.hi_features(enc_hi, q_lo), generator, float("inf"))
    for quantizer in quantizers:
        quantizer.ema_update = True


def train_general_appearance(images: Sequence[str | Path], out: str | Path, config: VqTrainingConfig | None = None,
                             *, checkpoint: str | Path | None = None, checkpoint_every: int = 500,
                             fresh: bool = False, device: str | torch.device = "cpu",
                             progress: bool = True) -> dict[str, Any]:
    """Train the stage-1 model on the images in ``images`` (files or folders, searched
    recursively); write ``out`` (safetensors) and ``out`` with ``.json`` (the provenance record).

    ``checkpoint`` defaults to ``out`` + ``.checkpoint.pt``; an existing checkpoint of the same
    settings and images is resumed unless ``fresh``. Returns the provenance record.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from adlib import __version__
    from adlib.artifacts import git_commit
    from adlib.io import atomic_path, sha256_file, write_json
    from adlib.models.components.vq import GeneralAppearanceModel
    from adlib.run.predict import collect_images

    config = config or VqTrainingConfig()
    if int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be a positive number of steps; got {checkpoint_every}")
    paths = collect_images([Path(p) for p in images])
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file (the catalog looks for dsr_vq_model.safetensors); "
                         f"got {out}")
    checkpoint = Path(checkpoint) if checkpoint is not None else out.with_name(out.name + ".checkpoint.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    digest = _file_list_digest(paths)

    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GeneralAppearanceModel(**config.architecture(), decay=config.decay)
    model.to(device).train()
    for quantizer in (model.quant_lo, model.quant_hi):
        quantizer.ema_update = True
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    sampler = CropSampler(paths, config.img_size, generator)

    start_step, resumed_from, elapsed = 0, None, 0.0
    terms: dict[str, float] = {}
    state = None if fresh else _load_checkpoint(checkpoint, config, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_step = resumed_from = int(state["step"])
        elapsed = float(state.get("seconds", 0.0))
        terms = dict(state.get("terms", {}))
        log.info("train-dsr-vq: resuming from step %d of %d (%s)", start_step, config.steps, checkpoint)

    def save_checkpoint(step: int) -> None:
        _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                          "generator": generator.get_state(), "config": dataclasses.asdict(config),
                          "images_digest": digest, "terms": terms,
                          "seconds": elapsed + time.perf_counter() - began}, checkpoint)

    began = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc="train-dsr-vq")
    for step in range(start_step, config.steps):
        x = sampler.batch(config.batch_size).to(device)
        if step == 0:
            _init_codebooks(model, x, generator)
        q = model.quantise(x)
        recon = model.decoder(model.join(q["q_lo"], q["q_hi"]))
        reconstruction = F.mse_loss(recon, x)
        loss = reconstruction + config.commitment * q["commitment"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-dsr-vq: the loss became {loss.item()} at step {step}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        restarted = (model.quant_lo.restart_dead_codes(q["z_lo"], generator, config.dead_code_threshold)
                     + model.quant_hi.restart_dead_codes(q["z_hi"], generator, config.dead_code_threshold))
        usage = float((model.quant_hi.cluster_size > config.dead_code_threshold).float().mean())
        terms = {"loss": float(loss.detach()), "reconstruction": float(reconstruction.detach()),
                 "commitment": float(q["commitment"].detach()),
                 "codes_restarted": restarted, "hi_codebook_usage": usage}
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", usage=f"{usage:.2f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(step + 1)
    bar.close()
    seconds = elapsed + time.perf_counter() - began

    record = {"format": FORMAT, "images": [str(Path(p)) for p in images], "num_images": len(paths),
              "images_digest": digest, **dataclasses.asdict(config), "resumed_from_step": resumed_from,
              "final": terms, "seconds": round(seconds, 1), "device": str(device), "adlib_version": __version__,
              "torch_version": torch.__version__, "git_commit": git_commit(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(weights, str(tmp), metadata={"format": FORMAT, "provenance": json.dumps(record)})
    record["sha256"] = sha256_file(out)
    write_json(out.with_suffix(".json"), record)
    return record
