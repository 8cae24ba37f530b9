"""Atomic writes and explicit settings."""
from __future__ import annotations

import json

import pytest

from adlib.io import atomic_path, read_json, sha256_file, staged_directory, write_json, write_text
from adlib.settings import Settings


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_staged_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "folder"
    with staged_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_directory(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with staged_directory(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # no temporary or old folders left


def test_atomic_path_keeps_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path


def test_write_json_handles_numpy_and_sha256(tmp_path):
    import numpy as np

    path = write_json(tmp_path / "x.json", {"v": np.float32(0.5), "arr": np.arange(3)})
    assert json.loads(path.read_text()) == {"v": 0.5, "arr": [0, 1, 2]}
    write_text(tmp_path / "t.txt", "abc")
    assert sha256_file(tmp_path / "t.txt") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_settings_precedence_file_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("data_root: /from/file\nseed: 1\nnum_workers: 3\n")
    monkeypatch.setenv("ADLIB_SEED", "5")
    settings = Settings.load(cfg, output_dir=tmp_path / "out")
    assert str(settings.data_root) == "/from/file"
    assert settings.seed == 5 and settings.num_workers == 3
    assert settings.output_dir == tmp_path / "out"
    assert settings.resolved_cache_dir == tmp_path / "out" / ".cache"
    with pytest.raises(Exception):
        settings.seed = 3  # frozen: no mutable globals


def test_settings_reject_unknown_keys_and_missing_file(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('{"dataset_dir": "/x"}')
    with pytest.raises(ValueError, match="unknown settings.*dataset_dir.*valid settings are"):
        Settings.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Settings.load(tmp_path / "missing.yaml")


def test_allocator_thresholds_apply_in_a_fresh_process():
    import subprocess
    import sys

    code = "from adlib.allocator import reuse_freed_memory as r; print(r(), r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]  # glibc here; idempotent


def test_keep_freed_memory_setting_from_the_environment(monkeypatch):
    assert Settings().keep_freed_memory is True
    for value, want in (("0", False), ("off", False), ("1", True), ("true", True)):
        monkeypatch.setenv("ADLIB_KEEP_FREED_MEMORY", value)
        assert Settings.load().keep_freed_memory is want


def test_job_device_leaves_the_allocator_alone_when_told_to():
    import subprocess
    import sys

    code = ("from adlib.run.device import job_device; from adlib.settings import Settings; import adlib.allocator as a;"
            "job_device(Settings(device='cpu', keep_freed_memory={})); print(a._done)")
    for keep, want in ((False, "False"), (True, "True")):
        out = subprocess.run([sys.executable, "-c", code.format(keep)], capture_output=True, text=True, check=True)
        assert out.stdout.split()[-1] == want


def test_memory_stages_record_each_stage_peak(monkeypatch):
    import numpy as np

    from adlib import memory_probe

    monkeypatch.setattr(memory_probe, "_peaks", {})  # restored (probing off) after the test
    monkeypatch.setattr(memory_probe, "_current", memory_probe.OTHER)
    monkeypatch.setattr(memory_probe, "_enabled", False)
    if not memory_probe.enable():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    with memory_probe.stage("big"):
        block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MiB, touched
        with memory_probe.stage("inner"):  # nested marks are ignored
            pass
        del block
    with memory_probe.stage("small"):
        pass
    peaks = memory_probe.stage_peaks()
    assert set(peaks) == {"other", "big", "small"}
    assert peaks["big"] > peaks["small"] + 150
    assert memory_probe.process_peak_mib() == max(peaks.values())
