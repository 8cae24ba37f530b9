"""Threshold analysis across runs: the four methods (and a model's own rule such as U-Flow's
a-contrario NFA, for the runs whose model has one) side by side, oracle vs transferred."""
from __future__ import annotations

import os
from typing import Iterable

import pandas as pd

from adlib.evaluation.thresholds import ALL_METHODS, MODEL_METHODS
from adlib.io import write_text
from adlib.reporting.html import markdown_table
from adlib.reporting.leaderboard import write_table
from adlib.reporting.runs import CONFUSION_KEYS, RUN_KEYS, THRESHOLD_METHODS, read_run_json, run_identity

#: metrics.json key -> the "kind" column value
KINDS = {"thresholds": "oracle", "transferred_thresholds": "transferred"}


def threshold_table(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run x method x kind (oracle: fitted on test; transferred: fitted on calibration).

    Methods that could not be fitted (e.g. no anomalies) have ``available = False`` and the reason
    in ``note``; runs without a calibration split have no transferred rows; a model's own rule
    (``nfa``) has rows only for the runs whose model has it.
    """
    rows = []
    for run_dir in run_dirs:
        metrics = read_run_json(run_dir, "metrics.json")
        config = read_run_json(run_dir, "config.json", required=False)
        notes = [str(n) for n in metrics.get("notes") or []]
        for key, kind in KINDS.items():
            results = metrics.get(key)
            if results is None:
                continue
            for method in (*THRESHOLD_METHODS, *(m for m in MODEL_METHODS if results.get(m))):
                result = results.get(method) or {}
                note = next((n.split(": ", 1)[-1] for n in notes if n.startswith(f"{key}.{method}")), "")
                rows.append({**run_identity(run_dir), "model_name": config.get("name"), "method": method,
                             "kind": kind, "available": bool(result),
                             **{field: result.get(field) for field in CONFUSION_KEYS}, "note": note})
    columns = [*RUN_KEYS, "model_name", "method", "kind", "available", *CONFUSION_KEYS, "note"]
    frame = pd.DataFrame(rows, columns=columns)
    for field in CONFUSION_KEYS:
        frame[field] = pd.to_numeric(frame[field], errors="coerce")
    return frame


def method_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and kind: runs, how many were available, mean F1/accuracy/precision/recall/specificity."""
    groups = table.groupby(["method", "kind"], sort=False)
    summary = groups.agg(runs=("available", "size"), available=("available", "sum"),
                         f1=("f1", "mean"), accuracy=("accuracy", "mean"), precision=("precision", "mean"),
                         recall=("recall", "mean"), specificity=("specificity", "mean")).reset_index()
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    return summary.sort_values(["method", "kind"], key=lambda c: c.map(order) if c.name == "method" else c,
                               kind="stable").reset_index(drop=True)


def transfer_gap(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean transferred minus oracle F1 and accuracy over runs that have both."""
    keys = [*RUN_KEYS, "method"]
    wide = table.pivot_table(index=keys, columns="kind", values=["f1", "accuracy"], aggfunc="first")
    if ("f1", "transferred") not in wide.columns:
        return pd.DataFrame(columns=["method", "runs", "f1_oracle", "f1_transferred", "f1_gap", "accuracy_gap"])
    wide = wide.dropna(subset=[("f1", "oracle"), ("f1", "transferred")])
    frame = pd.DataFrame({"f1_oracle": wide[("f1", "oracle")], "f1_transferred": wide[("f1", "transferred")],
                          "accuracy_gap": wide[("accuracy", "transferred")] - wide[("accuracy", "oracle")]})
    frame["f1_gap"] = frame["f1_transferred"] - frame["f1_oracle"]
    out = frame.groupby(level="method").agg(runs=("f1_gap", "size"), f1_oracle=("f1_oracle", "mean"),
                                            f1_transferred=("f1_transferred", "mean"), f1_gap=("f1_gap", "mean"),
                                            accuracy_gap=("accuracy_gap", "mean")).reset_index()
    return out


def best_method_per_model(table: pd.DataFrame) -> pd.DataFrame:
    """For each model: the method with the best mean F1 (transferred when the runs have it, else oracle)."""
    kind = "transferred" if (table["kind"] == "transferred").any() else "oracle"
    sub = table[(table["kind"] == kind) & table["available"]]
    means = sub.groupby(["model", "method"])["f1"].mean().reset_index()
    if means.empty:
        return pd.DataFrame(columns=["model", "method", "f1", "kind"])
    best = means.loc[means.groupby("model")["f1"].idxmax()].reset_index(drop=True)
    best["kind"] = kind
    return best


def threshold_markdown(table: pd.DataFrame) -> str:
    """The short readable summary (Markdown)."""
    n_runs = table[list(RUN_KEYS)].drop_duplicates().shape[0]
    has_transfer = (table["kind"] == "transferred").any()
    parts = ["# Threshold analysis", "",
             f"{n_runs} runs, four threshold methods"
             + (" and the models' own a-contrario rule (`nfa`: an image is anomalous when some position has "
                "a number of false alarms <= 1; nothing is fitted, so its oracle and transferred rows agree)"
                if table["method"].isin(MODEL_METHODS).any() else "")
             + ". **Oracle** thresholds are fitted on the test split "
             "and applied to it (optimistic: what the original specification reports). "
             + ("**Transferred** thresholds are fitted on the calibration split and applied to the test split "
                "(what a deployment sees)." if has_transfer else
                "No run has a calibration split, so there are no transferred thresholds "
                "(set `calibration: {method: calibration}` in the config)."), "",
             "## Methods side by side (means over runs)", "",
             markdown_table(method_summary(table), digits=3)]
    if has_transfer:
        parts += ["## Oracle vs transferred (F1 and accuracy gaps, transferred minus oracle)", "",
                  markdown_table(transfer_gap(table), digits=3)]
    parts += ["## Best method per model (by mean F1)", "", markdown_table(best_method_per_model(table), digits=3)]
    missing = table[~table["available"]]
    if not missing.empty:
        parts += ["## Thresholds that could not be fitted", ""]
        for (method, kind, note), group in missing.groupby(["method", "kind", "note"], dropna=False):
            parts.append(f"- {method} ({kind}), {len(group)} runs: {note or 'no threshold'}")
        parts.append("")
    return "\n".join(parts)


def write_threshold_analysis(run_dirs: Iterable[str | os.PathLike], out_csv: str | os.PathLike,
                             out_parquet: str | os.PathLike, out_md: str | os.PathLike) -> pd.DataFrame:
    """Threshold table (CSV + Parquet) and its Markdown summary from the runs' metrics.json."""
    table = threshold_table(list(run_dirs))
    write_table(table, out_csv)
    write_table(table, out_parquet)
    write_text(out_md, threshold_markdown(table))
    return table
