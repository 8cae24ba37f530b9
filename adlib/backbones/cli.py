"""`adlib backbones list|verify|checksum|where|train-dsr-vq|distill-teacher` (argparse sub-commands
for the main CLI).

The main CLI calls :func:`add_backbone_commands` on its sub-parsers; each command sets
``func(args) -> exit code``. ``python -m adlib.backbones.cli ...`` runs them stand-alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adlib.backbones.catalog import candidate_files, catalog_entry
from adlib.backbones.inventory import ManifestError, list_backbones, verify_backbones, write_checksums
from adlib.backbones.locate import MissingWeightsError, missing_message, resolve_weights


def _backbone_dir(args: argparse.Namespace) -> Path:
    if args.backbone_dir is not None:
        return Path(args.backbone_dir)
    from adlib.settings import Settings

    return Settings.load().backbone_dir


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def cmd_list(args: argparse.Namespace) -> int:
    rows = list_backbones(_backbone_dir(args))
    if args.missing:
        rows = [r for r in rows if not r["present"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"backbone directory: {_backbone_dir(args).resolve()}")
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        state = f"{r['kind']:<7}" if r["present"] else "MISSING"
        where = r["source"] if r["present"] else f"expected {r['expected']}"
        print(f"{r['name']:<{width}}  {state}  {_size(r['size']):>11}  {where}")
        if args.fetch and r["fetch"]:
            print(f"{'':<{width}}  fetch: {r['fetch']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        rows = verify_backbones(_backbone_dir(args), args.manifest)
    except (ManifestError, MissingWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['status']:<9} {r['path']}")
    bad = [r for r in rows if r["status"] in ("mismatch", "missing")]
    if not args.json:
        print(f"{len(rows) - len(bad)} ok/unlisted, {len(bad)} failed")
    return 1 if bad else 0


def cmd_checksum(args: argparse.Namespace) -> int:
    try:
        path = write_checksums(_backbone_dir(args), args.manifest)
    except MissingWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_where(args: argparse.Namespace) -> int:
    backbone_dir = _backbone_dir(args)
    try:
        source = resolve_weights(args.name, backbone_dir)
    except MissingWeightsError:
        print(missing_message(args.name, backbone_dir))
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name}: {source.package + ' ' if source.package else ''}{source.path}")
    print("accepted names:", ", ".join(candidate_files(args.name)))
    print("fetch:", catalog_entry(args.name).fetch)
    return 0


def cmd_train_dsr_vq(args: argparse.Namespace) -> int:
    from adlib.backbones.dsr_vq import DSR_VQ_FILE
    from adlib.backbones.dsr_vq_training import VqTrainingConfig, train_general_appearance

    config = VqTrainingConfig(steps=args.steps, batch_size=args.batch_size, img_size=args.img_size, lr=args.lr,
                              seed=args.seed, num_embeddings=args.num_embeddings, embedding_dim=args.embedding_dim,
                              hidden=args.hidden, residual_hidden=args.residual_hidden,
                              residual_layers=args.residual_layers)
    out = Path(args.out) if args.out else _backbone_dir(args) / DSR_VQ_FILE
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    record = train_general_appearance(args.images, out, config, checkpoint=args.checkpoint,
                                      checkpoint_every=args.checkpoint_every, fresh=args.fresh, device=device,
                                      progress=not args.quiet)
    resumed = f" (resumed from step {record['resumed_from_step']})" if record["resumed_from_step"] else ""
    print(f"wrote {out}{resumed}: {record['steps']} steps on {record['num_images']} images, "
          f"final loss {record['final'].get('loss', float('nan')):.4f}; provenance {out.with_suffix('.json')}")
    return 0


def cmd_distill_teacher(args: argparse.Namespace) -> int:
    from adlib.backbones.distill import DistillConfig, DistillError, default_output, distill_teacher, provenance_path
    from adlib.backbones.weights import WeightsFileError
    from adlib.training import resolve_device

    backbone_dir = _backbone_dir(args)
    output = Path(args.output) if args.output else default_output(backbone_dir, args.size)
    options = {key: getattr(args, key) for key in _DISTILL_OPTIONS}
    try:
        config = DistillConfig(images=args.images, size=args.size, layers=tuple(args.layers), **options)
        distill_teacher(config, output, backbone_dir=backbone_dir, device=resolve_device(args.device),
                        force=args.force, progress=not args.quiet)
    except (DistillError, MissingWeightsError, WeightsFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the checkpoint is kept beside {output}; run the same command to resume", file=sys.stderr)
        return 130
    print(f"wrote {output}\nrecord: {provenance_path(output)}")
    return 0


#: DistillConfig fields with a command-line option of the same name (defaults read from DistillConfig)
_DISTILL_OPTIONS = ("source", "steps", "batch_size", "lr", "img_size", "norm_images", "seed", "checkpoint_every")


def _add_distill_command(sub: argparse._SubParsersAction, common) -> None:
    import dataclasses

    from adlib.backbones.distill_config import DistillConfig
    from adlib.models.components.pdn_sizes import PDN_SIZES

    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    p = sub.add_parser("distill-teacher", help="distil an EfficientAD PDN teacher from a backbone (offline)",
                       description="Distil EfficientAD's PDN teacher from any backbone in the backbone directory or "
                                   "a pip weight package, on any folder of natural images (the paper's recipe). "
                                   "Writes <backbone-dir>/efficientad_teacher_<size>.safetensors; rerun the same "
                                   "command to resume an interrupted run.")
    common(p)
    p.add_argument("--images", required=True, help="folder of natural images (searched recursively)")
    p.add_argument("--size", choices=PDN_SIZES, default=defaults["size"], help="PDN size (default %(default)s)")
    p.add_argument("--layers", nargs="+", default=list(defaults["layers"]),
                   help="source layers, the first of stride 8 (default %(default)s)")
    helps = {"source": "backbone to distil from (the paper: %(default)s; e.g. tf_efficientnet_lite0)",
             "checkpoint_every": "steps between resumable checkpoints (default %(default)s)"}
    for key in _DISTILL_OPTIONS:
        value = defaults[key]
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                       help=helps.get(key, "default %(default)s"))
    p.add_argument("--output", default=None, help="teacher file (default <backbone-dir>/efficientad_teacher_<size>"
                                                  ".safetensors, where the catalog finds it)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")
    p.add_argument("--force", action="store_true", help="replace an existing teacher file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill_teacher)


def add_backbone_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``backbones`` with list / verify / checksum / where / train-dsr-vq / distill-teacher to a
    parser's sub-parsers."""
    parser = subparsers.add_parser("backbones", help="offline backbone weights: list, verify, checksum, where, "
                                                     "train-dsr-vq, distill-teacher",
                                   description="Offline backbone weights (nothing is ever downloaded).")
    sub = parser.add_subparsers(dest="backbones_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone-dir", default=None,
                       help="backbone directory (default: settings / ADLIB_BACKBONE_DIR / ./backbones)")

    p = sub.add_parser("list", help="catalog backbones and weight files, present or missing")
    common(p)
    p.add_argument("--missing", action="store_true", help="only missing backbones")
    p.add_argument("--fetch", action="store_true", help="show the fetch command for missing ones")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", help="check sha256 sums against a manifest (exit 1 on mismatch/missing)")
    common(p)
    p.add_argument("--manifest", default=None, help="manifest (default <dir>/SHA256SUMS.json or SHA256SUMS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("checksum", help="write <dir>/SHA256SUMS.json for every weight file")
    common(p)
    p.add_argument("--manifest", default=None, help="where to write (default <dir>/SHA256SUMS.json)")
    p.set_defaults(func=cmd_checksum)

    p = sub.add_parser("where", help="which file a backbone resolves to, or what to fetch")
    common(p)
    p.add_argument("name", help="timm name or catalog name, e.g. wide_resnet50_2")
    p.set_defaults(func=cmd_where)

    from adlib.backbones.dsr_vq_config import VqTrainingConfig

    d = VqTrainingConfig()
    p = sub.add_parser("train-dsr-vq", help="train DSR's general appearance (VQ) model on a folder of images",
                       description="DSR's stage 1 offline: train the vector-quantised general appearance model on "
                                   "any folder of natural or normal images; writes <backbone-dir>/"
                                   "dsr_vq_model.safetensors (found by dsr) and a .json provenance record. "
                                   "Resumes from its checkpoint when run again with the same settings.")
    common(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default=None, help="output .safetensors (default <backbone-dir>/dsr_vq_model.safetensors)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--img-size", type=int, default=d.img_size, help=f"side of the random crops (default {d.img_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-embeddings", type=int, default=d.num_embeddings,
                   help=f"codebook size (default {d.num_embeddings})")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help=f"default {d.embedding_dim}")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"default {d.hidden}")
    p.add_argument("--residual-hidden", type=int, default=d.residual_hidden, help=f"default {d.residual_hidden}")
    p.add_argument("--residual-layers", type=int, default=d.residual_layers, help=f"default {d.residual_layers}")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default <out>.checkpoint.pt)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_dsr_vq)
    _add_distill_command(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adlib")
    add_backbone_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
