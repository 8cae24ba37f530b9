"""The ``adlib`` command line: train, evaluate, predict, ensemble, list-models, backbones."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml


def _parse_value(text: str) -> Any:
    """``--set key=value`` values are YAML scalars/lists: 50, 0.1, true, [layer2, layer3]."""
    return yaml.safe_load(text)


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _settings(args: argparse.Namespace):
    from adlib.settings import Settings

    return Settings.load(args.settings, data_root=args.data_root, backbone_dir=args.backbone_dir,
                         output_dir=args.output_dir, seed=args.seed, device=args.device,
                         num_workers=args.num_workers)


def _add_settings_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (default: environment variables ADLIB_*, then built-ins)")
    group.add_argument("--settings", help="YAML/JSON settings file")
    group.add_argument("--data-root", help="folder holding the data sets")
    group.add_argument("--backbone-dir", help="folder holding offline backbone weights")
    group.add_argument("--output-dir", help="where runs are written")
    group.add_argument("--seed", type=int)
    group.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    group.add_argument("--num-workers", type=int)


def cmd_train(args: argparse.Namespace) -> int:
    from adlib.api import train

    results = train(args.dataset.split(","), args.category if args.category == "all" else args.category.split(","),
                    args.model, settings=_settings(args), pretrained=not args.random_backbone,
                    calibration=args.calibration, calibration_fraction=args.calibration_fraction,
                    **_overrides(args.set))
    for row in results:
        print(f"{row['dataset']}/{row['category']}/{row['model']}: image AUROC={row.get('image_auroc')} "
              f"pixel AUROC={row.get('pixel_auroc')} -> {row['run_dir']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adlib.run import evaluate_run

    settings = _settings(args)
    run_dir = evaluate_run(args.run_dir, args.manifest, settings, cache_root=settings.resolved_cache_dir,
                           calibration=args.calibration)
    print(Path(run_dir) / "metrics.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from adlib.ensemble.artifact import is_ensemble_dir

    if is_ensemble_dir(args.run_dir):  # an `adlib ensemble build` directory predicts like one run
        from adlib.ensemble.predict import predict_ensemble as predict
    else:
        from adlib.run import predict_images as predict
    table = predict(args.run_dir, args.images, _settings(args), out_csv=args.out,
                    threshold_method=args.threshold_method, overlay_dir=args.overlays)
    print(f"{len(table)} images scored, {int(table['anomalous'].sum())} anomalous -> {args.out}")
    return 0


def cmd_list_models(args: argparse.Namespace) -> int:
    from adlib.models.registry import get_spec, list_models

    from adlib.models.registry import aliases_of

    names = list_models(family=args.family, pattern=args.pattern)
    rows = []
    for name in names:
        spec = get_spec(name)
        t = spec.train
        budget = f"{t.num_epochs} epochs" if t.max_steps is None else f"{t.max_steps} steps"
        rows.append({"name": name, "family": spec.family, "scope": spec.scope, "train_labels": spec.train_labels,
                     "budget": budget, "batch_size": t.batch_size, "img_size": t.img_size,
                     "backbone": spec.model_defaults.get("backbone"), "aliases": aliases_of(name),
                     "description": spec.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        facts = [row["family"], row["budget"], f"batch {row['batch_size']}", f"{row['img_size']} px"]
        if row["backbone"]:
            facts.append(str(row["backbone"]))
        if row["scope"] == "dataset":
            facts.append("one model per data set")
        if row["train_labels"] == "labelled":
            facts.append("trains on labelled anomalies")
        aliases = f" (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"{row['name']}{aliases}\n    {' | '.join(facts)}\n    {row['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adlib", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate a model on data set categories")
    p.add_argument("dataset", help="data set name(s), comma separated (mvtec, visa, btad or a custom name)")
    p.add_argument("category", help="category name(s), comma separated, or 'all'")
    p.add_argument("model", help="registered model name (see `adlib list-models`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a registry option, e.g. --set num_epochs=5 --set backbone=resnet18")
    p.add_argument("--random-backbone", action="store_true", help="random-init backbones (tests only)")
    p.add_argument("--calibration", choices=["test", "calibration"], default="test",
                   help="fit thresholds on the test split (the original specification's way) or a held-out "
                        "calibration split")
    p.add_argument("--calibration-fraction", type=float, default=0.0,
                   help="share of the test images held out as the calibration split")
    _add_settings_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="(re)evaluate a trained run on a manifest")
    p.add_argument("run_dir")
    p.add_argument("--manifest", required=True, help="manifest Parquet of the category")
    p.add_argument("--calibration", choices=["test", "calibration"], default="test")
    _add_settings_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score new images with a trained run or an ensemble directory")
    p.add_argument("run_dir", help="a run folder, or an ensemble folder from `adlib ensemble build` (it also "
                                   "writes the fused maps beside --out, <stem>.maps.npz)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", default="scores.csv", help="CSV of scores and decisions (default scores.csv)")
    p.add_argument("--threshold-method", default="f1_percentile",
                   choices=["f1_percentile", "f1_uniform", "roc_youden", "percentile_95"])
    p.add_argument("--overlays", help="folder for overlay pictures (optional)")
    _add_settings_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("list-models", help="list registered model configurations")
    p.add_argument("--family", help="memory, flow, distillation, reconstruction, feature_adaptation, foundation")
    p.add_argument("--pattern", help="glob pattern, e.g. 'fastflow*'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list_models)

    from adlib.ensemble.cli import add_ensemble_commands

    add_ensemble_commands(sub)
    try:
        from adlib.backbones.cli import add_backbone_commands
    except ImportError:
        add_backbone_commands = None
    if add_backbone_commands is not None:
        add_backbone_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"adlib {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
