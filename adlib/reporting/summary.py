"""One self-contained HTML page over the aggregates (the workflow's ``report`` rule)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from adlib.io import read_json, write_text
from adlib.reporting.html import (demote_headings, embed_png, fmt, html_page, markdown_table, markdown_to_html,
                                  markdown_to_html_embedded)

#: per-model summary columns shown on the page, with short headings (the page fits 1400 px)
SUMMARY_VIEW = {"model": "model", "family": "family", "backbone": "backbone", "n_runs": "runs",
                "mean_rank": "mean rank", "image_auroc_mean": "image AUROC", "image_auroc_std": "± std",
                "pixel_auroc_mean": "pixel AUROC", "pixel_aupro_mean": "AUPRO", "fit_seconds_mean": "fit s",
                "inference_ms_batch_mean": "ms / image", "peak_rss_mb_mean": "peak RSS MiB"}


def _statistics_text(stats: dict) -> str:
    friedman = stats.get("friedman") or {}
    lines = ["## Ranking statistics", ""]
    if friedman.get("statistic") is not None:
        lines.append(f"Friedman test over {friedman['n_blocks']} categories and {friedman['n_models']} models: "
                     f"chi2 = {friedman['statistic']:.3f}, p = {friedman['p_value']:.3g}.")
    else:
        lines.append(f"Friedman test not computed: {friedman.get('note')}.")
    if stats.get("critical_difference") is not None:
        lines.append(f"Nemenyi critical difference at alpha = {stats['alpha']}: "
                     f"{stats['critical_difference']:.3f} mean-rank units.")
    lines += [""] + [f"- {note}" for note in stats.get("notes", [])] + [""]
    return "\n".join(lines)


def write_summary_report(out_html: str | os.PathLike, *, summary_csv: str | os.PathLike,
                         statistics_json: str | os.PathLike, cd_png: str | os.PathLike, cost_png: str | os.PathLike,
                         thresholds_md: str | os.PathLike, ensemble_md: str | os.PathLike) -> Path:
    """Leaderboard summary, statistics, cost view, threshold and ensemble reports on one page
    (the pictures ``ensemble_md`` refers to are embedded from its folder)."""
    summary = pd.read_csv(summary_csv)
    stats = read_json(statistics_json)
    view = summary.rename(columns=SUMMARY_VIEW)
    columns = [SUMMARY_VIEW[c] for c in SUMMARY_VIEW if c in summary.columns]
    metric = str(summary["rank_metric"].iloc[0]) if "rank_metric" in summary.columns and len(summary) else "image_auroc"
    head = ["# adlib benchmark summary", "",
            f"{int(summary['n_runs'].sum()) if len(summary) else 0} runs of {len(summary)} models; "
            f"ranks by `{metric}` (1 = best, averaged over categories). Full tables: "
            "`results/aggregate/leaderboard.csv` (one row per run) and `summary_by_model.csv`.", "",
            "## Models", "", markdown_table(view, columns, digits=4)]
    best = summary.iloc[0] if len(summary) else None
    if best is not None:
        head += [f"Best mean rank: **{best['model']}** ({fmt(best.get('mean_rank'), 3)}).", ""]
    ranking = ([markdown_to_html(_statistics_text(stats)), embed_png(cd_png, "critical-difference diagram")]
               if len(summary) > 1 else
               [markdown_to_html("## Ranking statistics\n\nOne model only: nothing to rank or compare.")])
    body = [markdown_to_html("\n".join(head)), *ranking,
            markdown_to_html("## Cost view"), embed_png(cost_png, "accuracy against cost"),
            markdown_to_html(demote_headings(Path(thresholds_md).read_text(encoding="utf-8"))),
            markdown_to_html_embedded(demote_headings(Path(ensemble_md).read_text(encoding="utf-8")),
                                      Path(ensemble_md).parent)]
    return write_text(out_html, html_page("adlib benchmark summary", "\n".join(body)))
