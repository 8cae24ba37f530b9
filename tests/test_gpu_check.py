"""The prepared device check runs on the CPU too: one configuration, a small budget, both output
files, and what it could not do within the budget listed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_within_its_budget(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--budget-s", "300",
           "--models", "padim", "--out", str(tmp_path), "--latency-size", "64", "--latency-batches", "1", "2",
           "--schedule-steps", "1", "--schedule-smoke-size"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"]["device"] == "cpu" and result["elapsed_s"] <= 300 + 60
    assert [(r["model"], r["status"]) for r in result["smoke"]] == [("padim", "pass")]
    assert {(r["model"], r["batch"], r["precision"]) for r in result["latency"]} == {("padim", 1, "fp32"),
                                                                                   ("padim", 2, "fp32")}
    [schedule] = result["schedule"]
    assert schedule["model"] == "padim" and schedule["grid_gpu_h"] > 0 and schedule["fit_s_per_category"] > 0
    assert any("efficientad-small" in s for s in result["skipped"])  # not selected: said, not silently dropped
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## Smoke" in text and "| padim | pass |" in text and "GPU-hours" in text
