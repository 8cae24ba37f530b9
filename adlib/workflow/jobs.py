"""The job context of the script adapters: a log file for everything a job prints, a thread
limit, and the job's frozen settings."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping


@contextlib.contextmanager
def job_context(log: str | os.PathLike | None = None, threads: int | None = None) -> Iterator[None]:
    """Run a job's body with stdout/stderr appended to ``log`` and torch limited to ``threads``."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        if "torch" in sys.modules or _torch_importable():
            import torch

            torch.set_num_threads(int(threads))
    if not log:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    import logging

    with open(log, "a", encoding="utf-8", buffering=1) as handle:
        os.dup2(handle.fileno(), 1), os.dup2(handle.fileno(), 2)  # C-level output and subprocesses
        sys.stdout = sys.stderr = handle
        logging.basicConfig(level=logging.INFO, stream=handle, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc()
            raise
        finally:
            handle.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1), os.dup2(saved_fds[1], 2)
            os.close(saved_fds[0]), os.close(saved_fds[1])


def _torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run_settings(config: Mapping[str, Any], seed: int | str):
    """The frozen :class:`adlib.Settings` of one job, from a validated config and the run's seed."""
    from adlib.settings import Settings

    return Settings(data_root=config["data_root"], backbone_dir=config["backbone_dir"],
                    output_dir=config.get("results", "results"),
                    seed=int(seed), num_workers=config["num_workers"], device=config["device"],
                    threads=config.get("threads"))
