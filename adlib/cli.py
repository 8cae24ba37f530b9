"""The ``adlib`` command line: train, evaluate, predict, ensemble, list-models, backbones.

Importing this module and building its parser import neither torch nor any model, so
``adlib --help`` and ``adlib list-models`` answer at once. Every failure a user can cause ends in
one clear message and exit code 2; ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

LAYOUTS = ("mvtec", "visa", "btad", "custom", "folder")


class UsageError(ValueError):
    """A command line that cannot be run as given."""


def _parse_value(text: str) -> Any:
    """``--set key=value`` values are YAML scalars/lists: 50, 0.1, true, [layer2, layer3]."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"--set value {text!r} is not a valid YAML value ({str(err).splitlines()[0]})") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string; on the command line it is a number
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r} (e.g. --set num_epochs=5)")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _settings(args: argparse.Namespace):
    from adlib.settings import Settings

    return Settings.load(args.settings, data_root=args.data_root, backbone_dir=args.backbone_dir,
                         output_dir=args.output_dir, seed=args.seed, device=args.device,
                         num_workers=args.num_workers, threads=args.threads)


def _add_settings_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (default: environment variables ADLIB_*, then built-ins)")
    group.add_argument("--settings", help="YAML/JSON settings file")
    group.add_argument("--data-root", help="folder holding the data sets (and auxiliary sets: dtd/, imagenette2/)")
    group.add_argument("--backbone-dir", help="folder holding offline backbone weights")
    group.add_argument("--output-dir", help="where runs are written")
    group.add_argument("--seed", type=int)
    group.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    group.add_argument("--num-workers", type=int)
    group.add_argument("--threads", type=int, help="torch threads (results of some models depend on it)")


def _check_names(model: str, overrides: dict[str, Any]) -> None:
    """Unknown model names and option keys fail from the registry index, before torch is imported
    (types, ranges and what the model refuses are checked next, before any work)."""
    import difflib

    from adlib.models.index import canonical, load_index

    index = load_index()
    name = canonical(model, index)
    if name is None:
        close = difflib.get_close_matches(model, [*index, *(a for e in index.values() for a in e["aliases"])], n=3)
        raise UsageError(f"unknown model {model!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + "; `adlib list-models` lists them")
    model_keys, train_keys = sorted(index[name]["model"]), sorted(index[name]["train"])
    unknown = [key for key in overrides if key not in model_keys and key not in train_keys]
    if unknown:
        hints = {k: difflib.get_close_matches(k, model_keys + train_keys, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {hints[k][0]}?)" if hints[k] else "") for k in unknown)
        raise UsageError(f"unknown option(s) {said} for model {name!r}. Model options: {', '.join(model_keys)}; "
                         f"training options: {', '.join(train_keys)}")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = _overrides(args.set)
    _check_names(args.model, overrides)
    from adlib.api import train

    results = train(args.dataset.split(","), args.category if args.category == "all" else args.category.split(","),
                    args.model, settings=_settings(args), layout=args.layout, root=args.root,
                    pretrained=not args.random_backbone, calibration=args.calibration,
                    calibration_fraction=args.calibration_fraction, overwrite=args.overwrite, **overrides)
    for row in results:
        print(f"{row['dataset']}/{row['category']}/{row['model']}: image AUROC={row.get('image_auroc')} "
              f"pixel AUROC={row.get('pixel_auroc')} -> {row['run_dir']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adlib.run import evaluate_run

    settings = _settings(args)
    run_dir = evaluate_run(args.run_dir, args.manifest, settings, cache_root=settings.resolved_cache_dir,
                           calibration=args.calibration, allow_other_data=args.other_data)
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


def runnable(entry: dict, backbone_dir, data_root) -> tuple[bool, list[str]]:
    """Whether a configuration can train now: its weight files and required auxiliary sets."""
    from adlib.backbones.locate import MissingWeightsError, resolve_weights
    from adlib.data import DataError
    from adlib.data.auxiliary import resolve_aux_source

    missing = []
    for name in entry["weights"]:
        try:
            resolve_weights(name, backbone_dir)
        except (MissingWeightsError, ValueError):
            missing.append(f"weights {name}")
    for stream in entry["auxiliary"]:
        try:
            resolve_aux_source(stream["source"], data_root)
        except DataError:
            missing.append(f"{stream['source']} images")
    return not missing, missing


def cmd_list_models(args: argparse.Namespace) -> int:
    import fnmatch

    from adlib.models.index import load_index

    index = load_index()
    families = sorted({e["family"] for e in index.values()})
    if args.family is not None and args.family not in families:
        raise UsageError(f"unknown family {args.family!r}; families: {', '.join(families)}")
    settings = _settings(args)
    rows = []
    for name, entry in sorted(index.items()):
        if (args.family and entry["family"] != args.family) or (args.pattern and not fnmatch.fnmatch(name, args.pattern)):
            continue
        ok, missing = runnable(entry, settings.backbone_dir, settings.data_root)
        if args.runnable and not ok:
            continue
        rows.append({"name": name, "runnable": ok, "missing": missing, **{k: entry[k] for k in (
            "family", "description", "scope", "train_labels", "aliases", "weights")},
            "budget": _budget(entry["train"]), "img_size": entry["train"]["img_size"],
            "batch_size": entry["train"]["batch_size"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "ready" if row["runnable"] else f"needs {', '.join(row['missing'])}"
        facts = [row["family"], row["budget"], f"batch {row['batch_size']}", f"{row['img_size']} px", state]
        if row["scope"] == "dataset":
            facts.append("one model per data set")
        if row["train_labels"] == "labelled":
            facts.append("trains on labelled anomalies")
        aliases = f" (also {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"{row['name']}{aliases}: {row['description']}\n    {' | '.join(facts)}")
    if not args.runnable:
        print(f"\n{sum(r['runnable'] for r in rows)} of {len(rows)} can run with the weights in "
              f"{settings.backbone_dir} and the pip weight packages (--runnable lists only those)")
    return 0


def _budget(train: dict) -> str:
    if train["max_steps"] is not None and train["num_epochs"] is None:
        return f"{train['max_steps']} steps"
    return f"{train['num_epochs']} epochs" + (f" / {train['max_steps']} steps" if train["max_steps"] else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adlib", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate a model on data set categories")
    p.add_argument("dataset", help="data set name(s), comma separated: the name runs are labelled with "
                                   "(mvtec, visa, btad are found under the data root; others: see --root)")
    p.add_argument("category", help="category name(s), comma separated, or 'all'")
    p.add_argument("model", help="registered model name (see `adlib list-models`)")
    p.add_argument("--layout", choices=LAYOUTS, help="how the data set is stored (default: from its name, or "
                                                     "detected in --root)")
    p.add_argument("--root", help="the data set's own folder (default: looked up under --data-root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a registry option, e.g. --set num_epochs=5 --set backbone=resnet18")
    p.add_argument("--overwrite", action="store_true", help="replace a run with other settings in the output folder")
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
    p.add_argument("--manifest", required=True, help="manifest Parquet of the run's category")
    p.add_argument("--calibration", choices=["test", "calibration"], default="test")
    p.add_argument("--other-data", action="store_true",
                   help="evaluate on a manifest of another data set or category on purpose (recorded)")
    _add_settings_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score new images with a trained run or an ensemble directory")
    p.add_argument("run_dir", help="a run folder, or an ensemble folder from `adlib ensemble build` (it also "
                                   "writes the fused maps beside --out, <stem>.maps.npz)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", default="scores.csv", help="CSV of scores and decisions (default scores.csv)")
    p.add_argument("--threshold-method", default="f1_percentile",
                   choices=["f1_percentile", "f1_uniform", "roc_youden", "percentile_95", "nfa"],
                   help="a fitted threshold, or nfa: U-Flow's own a-contrario rule (nothing fitted)")
    p.add_argument("--overlays", help="folder for overlay pictures (optional)")
    _add_settings_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("list-models", help="list registered model configurations and whether they can run now")
    p.add_argument("--family", help="memory, flow, distillation, reconstruction, feature_adaptation, foundation")
    p.add_argument("--pattern", help="glob pattern, e.g. 'fastflow*'")
    p.add_argument("--runnable", action="store_true", help="only configurations whose weights are present")
    p.add_argument("--json", action="store_true")
    _add_settings_args(p)
    p.set_defaults(func=cmd_list_models)

    from adlib.backbones.cli import add_backbone_commands
    from adlib.ensemble.cli import add_ensemble_commands

    add_ensemble_commands(sub)
    add_backbone_commands(sub)
    return parser


def user_error_message(error: BaseException) -> str | None:
    """The one-line story of a failure the user can fix, or None for a bug."""
    import errno as errnos

    name = type(error).__name__
    if isinstance(error, OSError) and error.errno in (errnos.ENOSPC, errnos.EDQUOT):
        where = f" writing {error.filename}" if error.filename else ""
        return f"no space left on the device{where}: free some space or choose another output folder ({error})"
    if isinstance(error, OSError) and error.errno in (errnos.EROFS, errnos.EACCES, errnos.EPERM):
        return f"permission denied: {error}. Choose an output folder you can write to (--output-dir)"
    if isinstance(error, (RuntimeError, MemoryError)) and any(
            text in str(error) for text in ("out of memory", "can't allocate memory", "not enough memory")):
        return (f"out of memory ({str(error).splitlines()[0][:160]}): use a smaller batch_size or img_size "
                "(--set batch_size=8), or a machine with more memory")
    if isinstance(error, (ValueError, KeyError, OSError)) or name in ("NonFiniteLossError", "DeviceClaimError"):
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        return text or name
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"adlib {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - classified below; bugs keep their traceback
        message = user_error_message(error)
        if args.verbose or message is None:
            import traceback

            traceback.print_exc()
        if message is None:
            print(f"adlib {args.command}: internal error ({type(error).__name__}); please report it with the "
                  "traceback above", file=sys.stderr)
            return 1
        print(f"adlib {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
