"""Cost view: accuracy against inference time per image and against fit time, Pareto front marked."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from adlib.reporting.leaderboard import write_table

#: (leaderboard column, axis label, (low, high) spread columns) of the two cost axes
COST_AXES = (("inference_ms_batch", "inference ms / image (batched; median, bars: 25-75 %)",
              ("inference_ms_batch_p25", "inference_ms_batch_p75")),
             ("fit_seconds", "fit time (s; median over runs, bars: min-max)", ("fit_seconds_min", "fit_seconds_max")))
_SPREAD_COLUMNS = ("inference_ms_batch_p25", "inference_ms_batch_p75", "inference_ms_b1_p25", "inference_ms_b1_p75",
                   "timing_load_1min")


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Mask of points no other point beats: lower-or-equal cost and higher-or-equal value, one strictly.

    Points with a missing cost or value are never on the front.
    """
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    ok = np.isfinite(cost) & np.isfinite(value)
    front = np.zeros(len(cost), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = (cost[others] <= cost[i]) & (value[others] >= value[i]) & (
            (cost[others] < cost[i]) | (value[others] > value[i]))
        front[i] = not dominated.any()
    return front


def cost_table(leaderboard: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """Per model: mean ``metric``, mean costs and whether it is on each Pareto front."""
    board = leaderboard.assign(**{c: leaderboard.get(c, np.nan) for c in _SPREAD_COLUMNS})
    groups = board.groupby("model", sort=True)
    table = pd.DataFrame({
        metric: groups[metric].mean(),
        "inference_ms_batch": groups["inference_ms_batch"].median(),
        "inference_ms_batch_p25": groups["inference_ms_batch_p25"].median(),
        "inference_ms_batch_p75": groups["inference_ms_batch_p75"].median(),
        "inference_ms_b1": groups["inference_ms_b1"].median(),
        "inference_ms_b1_p25": groups["inference_ms_b1_p25"].median(),
        "inference_ms_b1_p75": groups["inference_ms_b1_p75"].median(),
        "fit_seconds": groups["fit_seconds"].median(),
        "fit_seconds_min": groups["fit_seconds"].min(),
        "fit_seconds_max": groups["fit_seconds"].max(),
        "peak_rss_mb": groups["peak_rss_mb"].max(),
        "load_1min_max": groups["timing_load_1min"].max(),
        "n_runs": groups.size(),
    }).reset_index()
    for column, _, _ in COST_AXES:
        table[f"pareto_{column}"] = pareto_front(table[column].to_numpy(), table[metric].to_numpy())
    return table


def plot_cost_view(table: pd.DataFrame, path: str | os.PathLike, metric: str = "image_auroc") -> Path:
    """Two panels (ms/image, fit s) with every model, the Pareto front joined and highlighted."""
    from adlib.figures import new_figure, save_figure

    fig, axes = new_figure(11, 4.5, ncols=2)
    for ax, (column, label, (low, high)) in zip(axes, COST_AXES):
        x, y = table[column].to_numpy(float), table[metric].to_numpy(float)
        front = table[f"pareto_{column}"].to_numpy(bool)
        spread = np.vstack([x - table[low].to_numpy(float), table[high].to_numpy(float) - x])
        ax.errorbar(x, y, xerr=np.where(np.isfinite(spread), np.clip(spread, 0, None), 0), fmt="none",
                    ecolor="0.6", elinewidth=1, capsize=2, zorder=1)
        ax.scatter(x[~front], y[~front], color="tab:gray", label="dominated", zorder=2)
        ax.scatter(x[front], y[front], color="tab:red", label="Pareto front", zorder=3)
        order = np.argsort(x[front])
        ax.step(x[front][order], y[front][order], where="post", color="tab:red", lw=1, zorder=1)
        for xi, yi, name in zip(x, y, table["model"]):
            if np.isfinite(xi) and np.isfinite(yi):
                ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        finite = x[np.isfinite(x) & (x > 0)]
        if len(finite) and finite.max() / finite.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (mean over runs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    load = table["load_1min_max"].max()
    conditions = f"; machine load up to {load:.1f} while timing" if np.isfinite(load) else ""
    fig.suptitle(f"Cost view: {metric} against inference and fit cost (upper-left is better{conditions})",
                 fontsize=10)
    return save_figure(fig, path, dpi=120)


def write_cost_view(leaderboard: str | os.PathLike, out_csv: str | os.PathLike, out_png: str | os.PathLike,
                    metric: str = "image_auroc") -> pd.DataFrame:
    """Cost table (CSV) and cost view (PNG) from the leaderboard Parquet."""
    table = cost_table(pd.read_parquet(leaderboard), metric)
    write_table(table, out_csv)
    plot_cost_view(table, out_png, metric)
    return table
