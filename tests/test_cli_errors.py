"""The command line as a user meets it: data anywhere (--layout/--root), runs kept apart, and
every user-caused failure ending in one clear message with exit code 2 (``-v`` adds the
traceback), checked before any expensive work where possible."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adlib.cli import main as cli
from adlib.data.synthetic import make_dataset

TINY = ["--set", "img_size=32", "--set", "backbone=resnet18", "--set", "n_features=20", "--random-backbone",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_dataset("mvtec", root / "parts", categories=("widget", "gear"), n_train=6, n_test_good=3, n_test_bad=3,
                 size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert cli(["train", "mine", "widget", "padim", "--root", str(data / "parts"), "--output-dir", str(out),
                *TINY]) == 0
    return out


def _error(capsys, argv) -> str:
    capsys.readouterr()  # forget what earlier commands printed
    assert cli(argv) == 2
    err = capsys.readouterr().err
    head = f"adlib {argv[0]}: error: "
    assert "Traceback" not in err and head in err and err.count(head) == 1
    return err[err.index(head):]  # after any progress bars of the work done before the failure


def test_data_anywhere_labelled_by_its_own_name(trained, data):
    run = trained / "mine" / "widget" / "padim"
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "mine" and (run / "metrics.json").is_file()


def test_not_found_errors_say_which_layout_was_assumed(capsys, data, tmp_path):
    err = _error(capsys, ["train", "mvtec", "widget", "padim", "--data-root", str(data), "--output-dir",
                          str(tmp_path), *TINY])
    assert "assumed layout 'mvtec'" in err and "--layout" in err and "--root" in err
    err = _error(capsys, ["train", "mine", "widget", "padim", "--root", str(data), "--output-dir", str(tmp_path),
                          *TINY])
    assert "cannot tell the layout" in err and "--layout" in err
    err = _error(capsys, ["train", "mine", "widget", "padim", "--layout", "btad", "--root", str(data / "parts"),
                          "--output-dir", str(tmp_path), *TINY])
    assert "widget" in err and "btad" in err.lower()


def test_another_seed_or_other_options_never_replace_a_run_silently(capsys, trained, data):
    args = ["train", "mine", "widget", "padim", "--root", str(data / "parts"), "--output-dir", str(trained), *TINY]
    before = (trained / "mine/widget/padim/model.safetensors").read_bytes()
    err = _error(capsys, [*args, "--seed", "7"])
    assert "other settings" in err and "seed" in err and "--overwrite" in err
    err = _error(capsys, [*args, "--set", "n_features=10"])
    assert "n_features: 20 -> 10" in err
    assert (trained / "mine/widget/padim/model.safetensors").read_bytes() == before
    assert cli([*args, "--set", "n_features=10", "--overwrite"]) == 0
    assert json.loads((trained / "mine/widget/padim/config.json").read_text())["model"]["n_features"] == 10
    assert cli([*args, "--set", "n_features=10"]) == 0  # the same run again is fine


def test_evaluating_another_categorys_manifest_needs_a_flag_and_is_recorded(capsys, trained, data, tmp_path):
    assert cli(["train", "mine", "gear", "padim", "--root", str(data / "parts"), "--output-dir", str(tmp_path),
                *TINY]) == 0
    gear = str(tmp_path / "mine/gear/manifest.parquet")
    run = str(trained / "mine/widget/padim")
    err = _error(capsys, ["evaluate", run, "--manifest", gear, "--device", "cpu"])
    assert "categories gear" in err and "widget" in err and "--other-data" in err
    assert cli(["evaluate", run, "--manifest", gear, "--device", "cpu", "--other-data"]) == 0
    metrics = json.loads((trained / "mine/widget/padim/metrics.json").read_text())
    assert metrics["evaluated_on"] == {"dataset": ["mine"], "categories": ["gear"]}


@pytest.mark.parametrize(("extra", "expected"), [
    (["--set", "backbone=resnet18x"], "unknown backbone 'resnet18x'"),
    (["--set", "num_epochs=abc"], "num_epochs: 'abc' is not an integer"),
    (["--set", "img_size=-5"], "img_size: -5 is out of range"),
    (["--set", "n_features=100000"], "n_features=100000 is impossible"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
    (["--device", "cdua"], "invalid device 'cdua'"),
    (["--calibration", "calibration"], "give calibration_fraction in (0, 1)"),
])
def test_bad_options_fail_before_any_work_with_one_message(capsys, data, tmp_path, extra, expected):
    out = tmp_path / "out"
    err = _error(capsys, ["train", "mine", "widget", "padim", "--root", str(data / "parts"), "--output-dir", str(out),
                          *TINY, *extra])
    assert expected in err
    assert not out.exists() or not any(out.rglob("*px*")), "no cache folder for a refused size"


def test_environment_and_value_errors_name_their_source(data, tmp_path):
    env = {**os.environ, "ADLIB_SEED": "abc"}
    done = subprocess.run([sys.executable, "-m", "adlib.cli", "train", "mine", "widget", "padim", "--root",
                           str(data / "parts")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "ADLIB_SEED='abc' is not an integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_nan_loss_is_one_message_and_verbose_shows_the_traceback(capsys, data, tmp_path):
    args = ["train", "mine", "widget", "stfpm", "--root", str(data / "parts"), "--output-dir", str(tmp_path),
            "--set", "img_size=32", "--set", "backbone=resnet18", "--set", "lr=1e30", "--set", "max_steps=3",
            "--set", "batch_size=4", "--random-backbone", "--device", "cpu"]
    err = _error(capsys, args)
    assert "became" in err and "lower learning rate" in err
    capsys.readouterr()
    assert cli(["-v", *args]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_predict_on_a_truncated_or_unevaluated_run_is_refused(capsys, trained, data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "mine/widget/padim", run)
    images = str(data / "parts/widget/test")
    (run / "metrics.json").unlink()
    err = _error(capsys, ["predict", str(run), images, "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert "was not evaluated" in err and "Errno" not in err
    shutil.copy(trained / "mine/widget/padim/metrics.json", run / "metrics.json")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _error(capsys, ["predict", str(run), images, "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert "does not match its completion record" in err


def test_full_and_read_only_output_folders_are_one_message(capsys, data, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount small / read-only tmpfs folders")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(full)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        base = ["train", "mine", "widget", "padim", "--root", str(data / "parts"), *TINY,
                "--settings", str(_settings_file(tmp_path))]
        err = _error(capsys, [*base, "--output-dir", str(full)])
        assert "no space left" in err
        err = _error(capsys, [*base, "--output-dir", str(ro)])
        assert "permission denied" in err or "cannot write" in err
    finally:
        subprocess.run(["umount", str(full)])
        subprocess.run(["umount", str(ro)])


def _settings_file(tmp_path: Path) -> Path:
    """Settings with the image cache outside the tiny output folders."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"cache_dir": str(tmp_path / "cache")}))
    return path
