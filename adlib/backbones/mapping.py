"""State-dict key mappings from other code bases' layouts to timm's.

- torchvision MobileNetV2 (``features.N...``) -> timm ``mobilenetv2_*``
- lukemelas EfficientNet / EfficientNet-Lite (``_blocks.N._expand_conv...``) -> timm
  ``tf_efficientnet_*`` / ``tf_efficientnet_lite*`` (TF ports, "same" padding, BN eps 1e-3)
- torchvision ResNet / WideResNet already use timm's key names (no mapping needed).
- Hugging Face transformers DINOv2 (``encoder.layer.N.attention.attention.query``) -> the
  official DINOv2 layout (then timm's filter below)
- anything else: timm's own ``checkpoint_filter_fn`` for the architecture (official DINOv2
  hub files, positional-embedding resampling for another image size, ...).

Each mapping is a pure function ``(source_state_dict, target_keys) -> state_dict``; blocks are
paired in order, so the same function serves every width/depth variant. Whether the result
fits is checked by the caller against the real model (keys and shapes).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

StateDict = dict[str, torch.Tensor]


class MappingError(ValueError):
    """The source keys do not follow the layout a mapping expects."""


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest module prefix of ``rest`` found in ``table``."""
    for prefix in sorted(table, key=len, reverse=True):
        if rest.startswith(prefix + "."):
            return table[prefix] + rest[len(prefix):]
    return None


def timm_block_order(target_keys: Iterable[str]) -> list[str]:
    """timm EfficientNet-family block prefixes in forward order: ['blocks.0.0', 'blocks.1.0', ...]."""
    blocks = {m.group(1) for k in target_keys if (m := re.match(r"(blocks\.\d+\.\d+)\.", k))}
    return sorted(blocks, key=lambda b: tuple(int(x) for x in b.split(".")[1:]))


def _index_groups(source: Mapping[str, torch.Tensor], pattern: str) -> dict[int, dict[str, torch.Tensor]]:
    """Group keys matching ``<pattern>.<int>.<rest>`` by the integer: {i: {rest: tensor}}."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    regex = re.compile(rf"^{re.escape(pattern)}\.(\d+)\.(.+)$")
    for key, value in source.items():
        if m := regex.match(key):
            groups.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return groups


def _map_blocks(blocks: Mapping[int, Mapping[str, torch.Tensor]], target_blocks: list[str],
                choose_table: Callable[[Mapping[str, torch.Tensor]], Mapping[str, str]], what: str) -> StateDict:
    if len(blocks) != len(target_blocks):
        raise MappingError(f"{what}: the file has {len(blocks)} blocks, the timm model {len(target_blocks)} "
                           "(a different width/depth variant)")
    out: StateDict = {}
    for (index, params), prefix in zip(sorted(blocks.items()), target_blocks):
        table = choose_table(params)
        for rest, value in params.items():
            new = _rename(rest, table)
            if new is None:
                raise MappingError(f"{what}: unexpected key in block {index}: {rest!r}")
            out[f"{prefix}.{new}"] = value
    return out


# torchvision MobileNetV2 ----------------------------------------------------------------------
_TV_MBV2_DS = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_MBV2_IR = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
               "conv.2": "conv_pwl", "conv.3": "bn3"}


def is_torchvision_mobilenet_v2(source: Mapping[str, torch.Tensor]) -> bool:
    return "features.0.0.weight" in source and "features.1.conv.0.0.weight" in source


def torchvision_mobilenet_v2_to_timm(source: Mapping[str, torch.Tensor], target_keys: Iterable[str]) -> StateDict:
    """torchvision ``mobilenet_v2`` state dict -> timm ``mobilenetv2_*`` keys."""
    features = _index_groups(source, "features")
    if not features or 0 not in features:
        raise MappingError("torchvision MobileNetV2: no 'features.0' stem")
    last = max(features)
    stem, head = features.pop(0), features.pop(last)
    out: StateDict = {}
    for rest, value in stem.items():
        out[_rename(rest, {"0": "conv_stem", "1": "bn1"}) or _fail("stem", rest)] = value
    for rest, value in head.items():
        out[_rename(rest, {"0": "conv_head", "1": "bn2"}) or _fail("head", rest)] = value
    out.update(_map_blocks(features, timm_block_order(target_keys),
                           lambda p: _TV_MBV2_IR if any(k.startswith("conv.3.") for k in p) else _TV_MBV2_DS,
                           "torchvision MobileNetV2"))
    for key, value in source.items():
        if key.startswith("classifier.1."):
            out["classifier." + key[len("classifier.1."):]] = value
        elif not key.startswith("features."):
            _fail("top level", key)
    return out


# lukemelas EfficientNet(-Lite) -----------------------------------------------------------------
_LM_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LM_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
          "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def is_lukemelas_efficientnet(source: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in source and any(k.startswith("_blocks.") for k in source)


def lukemelas_efficientnet_to_timm(source: Mapping[str, torch.Tensor], target_keys: Iterable[str]) -> StateDict:
    """lukemelas-style EfficientNet / EfficientNet-Lite state dict -> timm ``tf_efficientnet*`` keys.

    Blocks without ``_expand_conv`` (expansion ratio 1) are timm's DepthwiseSeparableConv.
    """
    out = _map_blocks(_index_groups(source, "_blocks"), timm_block_order(target_keys),
                      lambda p: _LM_IR if any(k.startswith("_expand_conv.") for k in p) else _LM_DS,
                      "lukemelas EfficientNet")
    for key, value in source.items():
        if not key.startswith("_blocks."):
            out[_rename(key, _LM_TOP) or _fail("top level", key)] = value
    return out


# Hugging Face transformers DINOv2 (Dinov2Model / Dinov2WithRegistersModel) --------------------------
_HF_DINOV2_LAYER = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
                    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_DINOV2_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
                  "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
                  "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                  "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                  "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


#: transformers < 5 (and the files on the Hub) use attention.attention.query; transformers 5 q_proj
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")


def is_hf_dinov2(source: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in source) and \
        any(re.search(r"\.attention\.(attention\.query|q_proj)\.", k) for k in source)


def hf_dinov2_to_official(source: Mapping[str, torch.Tensor], target_keys: Iterable[str] = ()) -> StateDict:
    """transformers DINOv2 state dict -> the official (torch.hub) DINOv2 layout, which timm's
    ``checkpoint_filter_fn`` then converts (registers, positional-embedding resampling)."""
    prefix = next(k for k in source if k.endswith("embeddings.patch_embeddings.projection.weight"))
    prefix = prefix[: -len("embeddings.patch_embeddings.projection.weight")]  # "" or e.g. "dinov2."
    src = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in src.items():
        if key in _HF_DINOV2_TOP:
            out[_HF_DINOV2_TOP[key]] = value
        elif m := _HF_QKV.match(key):
            part = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}.get(m.group(2), m.group(2))
            qkv.setdefault(int(m.group(1)), {})[f"{part}.{m.group(3)}"] = value
        elif m := re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key):
            rest = m.group(2)
            new = _HF_DINOV2_LAYER.get(rest) or _rename(rest, _HF_DINOV2_LAYER)
            out[f"blocks.{m.group(1)}.{new or _fail('encoder layer', key)}"] = value
        else:
            _fail("top level", key)
    for index, parts in qkv.items():
        for kind in ("weight", "bias"):
            try:
                out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[f"{p}.{kind}"] for p in ("query", "key", "value")])
            except KeyError as exc:
                raise MappingError(f"transformers DINOv2: layer {index} lacks {exc}") from exc
    out.setdefault("mask_token", torch.zeros(1, out["cls_token"].shape[-1]))  # marks the official layout
    return out


def _fail(where: str, key: str) -> str:
    raise MappingError(f"unexpected key at {where}: {key!r}")


#: (format name, detector, mapping), tried in order when the file's keys are not timm's
CONVERTERS: list[tuple[str, Callable[[Mapping[str, torch.Tensor]], bool],
                       Callable[[Mapping[str, torch.Tensor], Iterable[str]], StateDict]]] = [
    ("torchvision-mobilenet_v2", is_torchvision_mobilenet_v2, torchvision_mobilenet_v2_to_timm),
    ("lukemelas-efficientnet", is_lukemelas_efficientnet, lukemelas_efficientnet_to_timm),
    ("transformers-dinov2", is_hf_dinov2, hf_dinov2_to_official),
]


def unwrap_state_dict(obj: object) -> StateDict:
    """The tensor dict inside a checkpoint: unwraps {'state_dict'|'model'|'module': ...} and strips
    a DataParallel ``module.`` prefix. Raises MappingError when no tensor dict is found."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "model_state_dict") if k in obj), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise MappingError(f"expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise MappingError("the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors
