"""Every path of the workflow, in one place: rules, the run table and the scripts use these.

All outputs live under one results root (``results/`` by default). Templates keep Snakemake's
``{wildcards}``; :meth:`Paths.run` fills them for one run.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Paths:
    root: str = "results"

    # ----- data
    @property
    def data(self) -> str:
        """Generated (synthetic) data sets: ``<data>/<dataset>/<category>``."""
        return f"{self.root}/data"

    @property
    def manifest(self) -> str:
        """Prepared manifest; ``key`` hashes what decides it (layout, root, options, calibration
        fraction, data seed), so two studies naming a data set alike never share one."""
        return f"{self.root}/prepared/{{dataset}}/{{key}}/{{category}}/{{size}}/manifest.parquet"

    @property
    def cache(self) -> str:
        """Decoded-image cache shared by every job."""
        return f"{self.root}/cache"

    # ----- runs
    @property
    def run_template(self) -> str:
        return f"{self.root}/runs/{{dataset}}/{{category}}/{{model}}/{{seed}}"

    def run(self, dataset: str, category: str, model: str, seed: int | str) -> str:
        return self.run_template.format(dataset=dataset, category=category, model=model, seed=seed)

    def log(self, rule: str, key: str) -> str:
        """Log of one job: ``<root>/logs/<rule>/<key>.log`` (``key`` may hold wildcards)."""
        return f"{self.root}/logs/{rule}/{key}.log"

    def benchmark(self, rule: str, key: str) -> str:
        return f"{self.root}/benchmarks/{rule}/{key}.tsv"

    # ----- aggregates
    def aggregate(self, name: str) -> str:
        return f"{self.root}/aggregate/{name}"

    def ensemble(self, name: str) -> str:
        return f"{self.root}/ensemble/{name}"

    def report(self, name: str) -> str:
        return f"{self.root}/report/{name}"


#: the key of a run's log and benchmark files
RUN_KEY = "{dataset}/{category}/{model}/{seed}"
