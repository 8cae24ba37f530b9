"""Aggregates over finished runs, computed from the per-run files only (docs/outputs.md).

* :mod:`adlib.reporting.leaderboard`: one row per run, per-model summary, per-category ranks;
* :mod:`adlib.reporting.stats`: Friedman test, Nemenyi critical difference diagram, bootstrap CIs;
* :mod:`adlib.reporting.cost`: accuracy against inference and fit cost, Pareto front;
* :mod:`adlib.reporting.thresholds_summary`: the four threshold methods (and models' own rules) across runs;
* the ensemble report lives in :mod:`adlib.ensemble.report` (selection, fusion, deployable ensembles);
* :mod:`adlib.reporting.summary`: one self-contained HTML page; :mod:`adlib.reporting.html`: renderers.

Each module has one ``write_*`` entry point that the workflow's script adapters call.
"""
