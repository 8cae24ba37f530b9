"""Tiny finished-run directories with synthetic numbers, for the reporting tests.

Each run gets real per-run files in the run steps' format (config.json, fit.json,
provenance.json, scores.parquet, metrics.json, and the completion record run.json over a stand-in
weights file); metrics are computed from the written scores with adlib.evaluation, so aggregates
can be checked against them.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from adlib.evaluation.metrics import image_metrics
from adlib.evaluation.thresholds import threshold_report
from adlib.artifacts import write_record
from adlib.io import write_json


def make_run(root: Path, dataset: str, category: str, model: str, seed: int, *, separation: float = 2.0,
             n_normal: int = 20, n_anomalous: int = 20, calibration: bool = False, fit_seconds: float = 1.0,
             ms: float = 5.0, latent_seed: int | None = None, family: str = "memory") -> Path:
    """Write one finished run; scores: normal ~ N(0, 1), anomalous ~ N(separation, 1) plus a shared
    per-image component (seeded by ``latent_seed``, default per category) so models correlate."""
    run_dir = root / dataset / category / model / str(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([zlib.crc32(f'{dataset}/{category}/{model}'.encode()), seed])
    shared = np.random.default_rng(latent_seed if latent_seed is not None else zlib.crc32(f'{dataset}/{category}'.encode()))

    def split_scores(split: str, n0: int, n1: int) -> pd.DataFrame:
        labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
        latent = shared.normal(0, 1, n0 + n1)
        scores = 0.7 * latent + 0.7 * rng.normal(0, 1, n0 + n1) + separation * labels
        paths = [f"/data/{dataset}/{category}/{split}/{'bad' if y else 'good'}_{i:03d}.png"
                 for i, y in enumerate(labels)]
        return pd.DataFrame({"image_path": paths, "category": category,
                             "defect_type": np.where(labels == 1, "scratch", "good"), "label": labels,
                             "score": scores.astype(np.float32), "split": split})

    test = split_scores("test", n_normal, n_anomalous)
    frames = [test]
    calib_labels = calib_scores = None
    if calibration:
        calib = split_scores("calibration", max(n_normal // 4, 2), max(n_anomalous // 4, 2))
        frames.append(calib)
        calib_labels, calib_scores = calib["label"].to_numpy(), calib["score"].to_numpy()
    pd.concat(frames, ignore_index=True).to_parquet(run_dir / "scores.parquet", index=False)

    metrics = {**image_metrics(test["label"].to_numpy(), test["score"].to_numpy()),
               "pixel_auroc": 0.9, "pixel_aupro": 0.7}
    metrics.update(threshold_report(test["label"].to_numpy(), test["score"].to_numpy(), calib_labels, calib_scores))
    metrics.update({"inference_ms_b1": ms * 2, "inference_ms_batch": ms, "n_test": int(len(test)),
                    "n_normal": n_normal, "n_anomalous": n_anomalous})
    config = {"name": model, "family": family, "model": {"backbone": "tf_efficientnet_lite0", "normalize": True},
              "train": {"num_epochs": 1, "batch_size": 8, "img_size": 32}, "dataset": dataset,
              "category": category, "seed": seed, "pretrained": False}
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "fit.json", {"fit_seconds": fit_seconds, "epochs_run": 1, "steps": 3,
                                      "loss_history": [], "final_loss": None, "peak_rss_mb": 500.0,
                                      "peak_cuda_mb": None, "num_parameters": 1000, "stopped_early": False})
    write_json(run_dir / "provenance.json", {"adlib_version": "0.1.0", "torch_version": "2.x", "timm_version": "1.x",
                                             "python": "3.11", "git_commit": None, "seed": seed, "device": "cpu",
                                             "hostname": "test", "cpu": "x86", "gpu": None,
                                             "backbone": "tf_efficientnet_lite0", "random_backbone": True,
                                             "config_hash": "abc", "created": "2024-01-01T00:00:00"})
    (run_dir / "model.safetensors").write_bytes(f"weights of {model} {seed}".encode())
    metrics["weights_sha256"] = write_record(run_dir)["weights_sha256"]
    write_json(run_dir / "metrics.json", metrics)
    return run_dir


def make_grid(root: Path, models: dict[str, float], categories=("a", "b", "c"), seeds=(0,), **kwargs) -> list[Path]:
    """Runs for every category x model x seed; ``models`` maps name -> separation (quality)."""
    return [make_run(root, "ds", cat, model, seed, separation=sep, **kwargs)
            for cat in categories for model, sep in models.items() for seed in seeds]
