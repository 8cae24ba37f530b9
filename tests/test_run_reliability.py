"""Run directories change from one complete state to another: failed retrains and evaluations
never mix a new model with old metrics, completion records are checked, temporaries of killed
writers are cleaned, and outputs get the permissions the user's umask gives."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adlib import artifacts
from adlib.data.synthetic import make_dataset
from adlib.io import remove_stale_temporaries, sha256_file
from adlib.reporting.leaderboard import leaderboard_row
from adlib.reporting.runs import RunFileError
from adlib.run import evaluate_run, predict_images, prepare_data, train_run
from adlib.settings import Settings

FAST = {"img_size": 64, "backbone": "resnet18", "batch_size": 8}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    make_dataset("mvtec", root / "mvtec", categories=("widget",), n_train=8, n_test_good=4, n_test_bad=4, size=64,
                 seed=0)
    manifest = prepare_data({"name": "mvtec", "layout": "mvtec", "root": str(root / "mvtec")}, "widget", 64,
                            root / "manifest.parquet", root / "cache")
    return root, manifest


def _settings(root):
    return Settings(data_root=root, output_dir=root / "out", backbone_dir=root / "none", device="cpu", seed=0)


def _train_and_evaluate(root, manifest, run_dir, **overrides):
    settings = _settings(root)
    train_run(manifest, "padim", {**FAST, **overrides}, run_dir, settings, cache_root=root / "cache",
              pretrained=False, progress=False)
    evaluate_run(run_dir, manifest, settings, cache_root=root / "cache", progress=False)
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): sha256_file(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_retrain_that_runs_out_of_disk_keeps_the_previous_run(prepared, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    root, manifest = prepared
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = _train_and_evaluate(root, manifest, disk / "run")  # PaDiM at 64 px: ~10 MB of Gaussians
        before = _snapshot(run)
        with pytest.raises(OSError) as info:
            train_run(manifest, "padim", {**FAST, "n_features": 90}, run, _settings(root), cache_root=root / "cache",
                      pretrained=False, progress=False)
        assert info.value.errno == 28  # ENOSPC
        assert _snapshot(run) == before  # the previous run, complete and unchanged
        assert [p.name for p in disk.iterdir()] == ["run"]  # nothing half-written left beside it
        table = predict_images(run, [root / "mvtec/widget/test"], _settings(root), out_csv=tmp_path / "p.csv")
        assert len(table) == 8
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_retrain_whose_evaluation_fails_never_uses_the_old_thresholds(prepared, tmp_path):
    root, manifest = prepared
    run = _train_and_evaluate(root, manifest, tmp_path / "run")
    train_run(manifest, "padim", {**FAST, "n_features": 50}, run, _settings(root), cache_root=root / "cache",
              pretrained=False, progress=False)
    assert not (run / "metrics.json").exists()  # the old evaluation went with the old model
    with pytest.raises(artifacts.RunStateError, match="was not evaluated"):
        predict_images(run, [root / "mvtec/widget/test"], _settings(root), out_csv=tmp_path / "p.csv")
    with pytest.raises(RunFileError):
        leaderboard_row(run)


def test_an_evaluation_of_another_model_is_refused_by_predict_and_the_aggregates(prepared, tmp_path):
    root, manifest = prepared
    run = _train_and_evaluate(root, manifest, tmp_path / "run")
    stale = (run / "metrics.json").read_text()
    train_run(manifest, "padim", {**FAST, "n_features": 50}, run, _settings(root), cache_root=root / "cache",
              pretrained=False, progress=False)
    (run / "metrics.json").write_text(stale)  # an old evaluation copied back beside the new model
    with pytest.raises(artifacts.RunStateError, match="belongs to an earlier model"):
        predict_images(run, [root / "mvtec/widget/test"], _settings(root), out_csv=tmp_path / "p.csv")
    with pytest.raises(RunFileError, match="belongs to an earlier model"):
        leaderboard_row(run)


def test_a_damaged_model_file_is_named_before_predicting(prepared, tmp_path):
    root, manifest = prepared
    run = _train_and_evaluate(root, manifest, tmp_path / "run")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(artifacts.RunStateError, match="model.safetensors does not match its completion record"):
        predict_images(run, [root / "mvtec/widget/test"], _settings(root), out_csv=tmp_path / "p.csv")


_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from adlib.io import atomic_path, staged_directory
    folder = Path(sys.argv[1])
    with atomic_path(folder / "big.bin") as tmp:
        tmp.write_bytes(b"x" * 100000)
        with staged_directory(folder / "run") as stage:
            (stage / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), 9)
""")


def test_temporaries_of_killed_writers_are_removed_by_the_next_job(prepared, tmp_path):
    root, manifest = prepared
    folder = tmp_path / "out"
    _train_and_evaluate(root, manifest, folder / "run")
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(folder)])
    assert done.returncode == -9
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert len(leftovers) == 2 and all(".tmp-" in name for name in leftovers)
    train_run(manifest, "padim", FAST, folder / "run", _settings(root), cache_root=root / "cache",
              pretrained=False, progress=False)  # the next job into that folder cleans up
    assert sorted(p.name for p in folder.iterdir()) == ["run"]
    assert remove_stale_temporaries(folder) == []


def test_a_swap_interrupted_between_its_renames_is_undone(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        import adlib.io as io
        target = Path(sys.argv[1]) / "run"
        new = Path(sys.argv[1]) / "new"
        new.mkdir()
        real_rename = os.rename
        def rename_then_die(a, b):
            real_rename(a, b)
            if str(b).endswith(".old"):
                os.kill(os.getpid(), 9)
        io.os.rename = rename_then_die
        io.swap_into_place(new, target)
    """)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == -9
    assert not (tmp_path / "run").exists()
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_outputs_get_the_permissions_of_the_users_umask(prepared, tmp_path, umask):
    root, manifest = prepared
    old = os.umask(umask)
    try:
        run = _train_and_evaluate(root, manifest, tmp_path / "run")
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()]
    dirs = [run, *(p for p in run.rglob("*") if p.is_dir())]
    assert len(files) > 8 and (run / "overlays").is_dir()
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs} == {0o777 & ~umask}
