"""DSR's general appearance model (stage 1) as an offline weight file.

The catalog entry ``dsr_vq_model`` names the files looked for in the backbone directory: the
authors' release (``vq_model_pretrained_128_4096.pckl``, a ``torch.save``'d state dict, read with
``torch.load(weights_only=True)``: tensors only, never pickled objects) or the safetensors file
that ``adlib backbones train-dsr-vq`` writes (``dsr_vq_model.safetensors``). Both layouts are
accepted; shapes and codebook sizes are checked against the configuration before loading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adlib.backbones.weights import MissingWeightsError, WeightsFileError, read_state_dict, resolve_weights

#: catalog name of DSR's stage-1 file
DSR_VQ_NAME = "dsr_vq_model"
#: the file ``train-dsr-vq`` writes by default (found by the catalog's ``<name>.safetensors`` rule)
DSR_VQ_FILE = f"{DSR_VQ_NAME}.safetensors"


def train_hint(backbone_dir: str | Path | None) -> str:
    target = "<backbone_dir>" if backbone_dir is None else str(Path(backbone_dir))
    return ("Or train a general appearance model offline on any folder of natural or normal images (DSR's own "
            f"stage 1; writes {target}/{DSR_VQ_FILE}):\n"
            f"    adlib backbones train-dsr-vq IMAGE_FOLDER --backbone-dir {target}")


def load_general_appearance(model, backbone_dir: str | Path | None) -> dict[str, Any]:
    """Load the stage-1 file into ``model`` (a :class:`~adlib.models.components.vq.GeneralAppearanceModel`);
    returns its provenance. Raises MissingWeightsError naming the file and both ways to get it,
    WeightsFileError for an unreadable file or one of another shape or codebook size."""
    from adlib.models.components.vq import from_reference_layout, is_reference_layout, shape_of_state

    try:
        source = resolve_weights(DSR_VQ_NAME, backbone_dir)
    except MissingWeightsError as exc:
        raise MissingWeightsError(f"DSR needs its frozen general appearance model.\n{exc}\n{train_hint(backbone_dir)}"
                                  ) from None
    raw = read_state_dict(source.path)
    reference = is_reference_layout(raw)
    state = from_reference_layout(raw) if reference else raw
    found, wanted = shape_of_state(state), model.shape
    differing = {k: (found[k], wanted[k]) for k in wanted if found.get(k) != wanted[k]}
    if differing:
        listed = ", ".join(f"{k}: file {f} vs configured {w}" for k, (f, w) in differing.items())
        raise WeightsFileError(
            f"{source.path}: this general appearance model does not fit the DSR configuration ({listed}). "
            "Set the DSR options to the file's values (e.g. --set num_embeddings=..., embedding_dim=...) or use a "
            "file trained with the configured ones (adlib backbones train-dsr-vq --num-embeddings ... ).")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightsFileError(f"{source.path}: not a DSR general appearance model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}, wrong shapes {shapes[:5]}")
    model.load_state_dict(state, strict=True)
    return {**source.provenance("dsr-reference" if reference else "adlib-dsr-vq"), **found}
