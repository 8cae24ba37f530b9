"""``adlib ensemble build``: fit an ensemble of evaluated runs and write its directory."""
from __future__ import annotations

import argparse

from adlib.ensemble.fusion import FUSIONS
from adlib.ensemble.normalization import NORMALIZATIONS


def cmd_build(args: argparse.Namespace) -> int:
    from adlib.ensemble.artifact import build_ensemble, load_ensemble
    from adlib.io import read_json

    normalization, fusion, runs = args.normalization, args.fusion, list(args.run_dirs)
    if args.recommendation:
        from adlib.ensemble.runs import member_label

        rec = read_json(args.recommendation)
        if not rec.get("members"):
            raise ValueError(f"{args.recommendation} recommends no ensemble (fewer than two candidate models)")
        normalization, fusion = rec["normalization"], rec["fusion"]
        by_label = {member_label(d): d for d in runs}
        missing = [m for m in rec["members"] if m not in by_label]
        if missing:
            raise ValueError(f"the recommended members {missing} are not among the given runs "
                             f"({', '.join(sorted(by_label))}); pass their run folders")
        runs = [by_label[m] for m in rec["members"]]
    out = build_ensemble(runs, args.out_dir, normalization=normalization or "zscore", fusion=fusion or "mean")
    ensemble = load_ensemble(out)
    fitted = ensemble.fitted
    members = ", ".join(f"{m.label} ({m.content_hash[:12]})" for m in ensemble.members)
    print(f"ensemble of {members}: {fitted.normalization} + {fitted.fusion}, fitted on the {fitted.fit_split} "
          f"split -> {out}")
    for note in fitted.notes:
        print(f"  note: {note}")
    return 0


def add_ensemble_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``adlib ensemble build`` on the main parser's subcommands."""
    parser = sub.add_parser("ensemble", help="build a deployable ensemble of evaluated runs")
    commands = parser.add_subparsers(dest="ensemble_command", required=True)
    p = commands.add_parser("build", help="fit an ensemble on the runs' calibration split and write its directory "
                                          "(then: adlib predict OUT_DIR images/)")
    p.add_argument("out_dir", help="ensemble directory to write (replaced atomically)")
    p.add_argument("run_dirs", nargs="+", help="evaluated run folders of one category (the members)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, help="score/map normalisation (default zscore)")
    p.add_argument("--fusion", choices=FUSIONS, help="fusion rule (default mean)")
    p.add_argument("--recommendation", help="recommendation.json of the ensemble report: take its members (by "
                                            "label, from run_dirs) and rule")
    p.set_defaults(func=cmd_build)
