"""adlib.workflow: config validation, run table, source fingerprints, job context (no Snakemake)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adlib import workflow as wf
from adlib.models.registry import get_spec, list_models

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
#: two registered models: one producing anomaly maps, one image-level only when available
MODELS = [m for m in ("padim", "dfm") if m in list_models()][:1] + [m for m in ("dfkde", "patchcore")
                                                                     if m in list_models()][:1]


def _config(**changes):
    config = {"datasets": [{"name": "syn", "layout": "synthetic", "categories": ["widget", "gear"]}],
              "models": list(MODELS)}
    config.update(changes)
    return config


def _error(config) -> str:
    with pytest.raises(wf.ConfigError) as info:
        wf.validate_config(config, SCHEMA)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- validation
def test_defaults_are_filled_and_model_names_normalised():
    cfg = wf.validate_config(_config(), SCHEMA)
    assert cfg["seeds"] == [0] and cfg["img_size"] is None and cfg["pretrained"] is True
    assert cfg["results"] == "results"
    assert cfg["calibration"] == {"method": "test", "fraction": 0.2} and cfg["data_seed"] == 0
    assert cfg["ensemble"] == {"top_k": 3, "normalizations": ["zscore", "minmax", "rank"],
                               "fusions": ["mean", "max", "weighted"], "selection_metric": "image_auroc"}
    assert cfg["report"]["rank_metric"] == "image_auroc" and cfg["report"]["bootstrap"] == 1000
    assert cfg["models"][0] == {"name": MODELS[0], "label": MODELS[0], "overrides": {}}
    assert cfg["datasets"][0]["options"] == {}


def test_the_shipped_default_config_is_valid():
    import yaml

    cfg = wf.validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), SCHEMA)
    table = wf.build_run_table(cfg)
    assert len(table) >= 2


def test_unknown_keys_are_rejected_with_the_allowed_keys():
    text = _error(_config(modelz=["x"]))
    assert "config key '<top level>'" in text and "'modelz'" in text and "allowed keys:" in text and "datasets" in text
    text = _error(_config(ensemble={"topk": 3}))
    assert "config key 'ensemble'" in text and "top_k" in text


def test_bad_values_name_the_key_and_the_allowed_values():
    text = _error(_config(datasets=[{"name": "x", "layout": "mvtek", "root": "."}]))
    assert "datasets[0].layout" in text and "'mvtek' is not allowed" in text and "mvtec, visa, btad" in text
    text = _error(_config(ensemble={"top_k": 7}))
    assert "ensemble.top_k" in text and "maximum" in text
    text = _error(_config(calibration={"method": "holdout"}))
    assert "calibration.method" in text and "test, calibration" in text
    text = _error(_config(seeds="0"))
    assert "config key 'seeds'" in text
    text = _error(_config(datasets=[{"name": "x", "layout": "synthetic", "categories": "some"}]))
    assert "datasets[0].categories" in text and '"all"' in text


def test_unknown_model_lists_the_registered_names():
    text = _error(_config(models=[MODELS[0] + "x"]))
    assert f"unknown model '{MODELS[0]}x'" in text and "did you mean" in text
    assert "registered models:" in text and all(m in text for m in list_models())


def test_unknown_override_lists_the_valid_options():
    text = _error(_config(models=[{"name": MODELS[0], "overrides": {"bakbone": "x"}}]))
    assert "models[0].overrides" in text and "bakbone" in text and "num_epochs" in text


def test_duplicate_labels_names_and_dataset_rules():
    assert "used twice" in _error(_config(models=[MODELS[0], MODELS[0]]))
    twice = _config(models=[MODELS[0], {"name": MODELS[0], "label": "second"}])
    assert [m["label"] for m in wf.validate_config(twice, SCHEMA)["models"]] == [MODELS[0], "second"]
    ds = {"name": "syn", "layout": "synthetic", "categories": ["a"]}
    assert "used twice" in _error(_config(datasets=[ds, ds]))
    assert "explicit" in _error(_config(datasets=[{"name": "s", "layout": "synthetic"}]))
    assert "not used by layout 'synthetic'" in _error(_config(datasets=[{**ds, "root": "x"}]))
    assert "datasets[0].root': required" in _error(_config(datasets=[{"name": "m", "layout": "mvtec"}]))
    text = _error(_config(datasets=[{**ds, "options": {"n_train": 4, "colour": 1}}]))
    assert "unknown option(s) ['colour']" in text and "n_train" in text
    assert "data_seed" in _error(_config(datasets=[{**ds, "options": {"seed": 3}}]))


def test_every_problem_is_reported_at_once_before_any_job(tmp_path):
    config = _config(models=[{"name": MODELS[0], "overrides": {"num_epochs": "abc", "img_size": -8}},
                             {"name": "padim", "overrides": {"backbone": "resnet18x"}},
                             {"name": "padim", "label": "p2", "overrides": {"n_features": 100000}}],
                     datasets=[{"name": "f", "layout": "folder", "root": str(tmp_path),
                                "options": {"normal_dirs": "../../etc"}}], ensemble={"top_k": 9})
    text = _error(config)
    for expected in ("ensemble.top_k", "models[0].overrides.num_epochs' ", "'abc' is not an integer",
                     "models[0].overrides.img_size", "unknown backbone 'resnet18x'", "n_features=100000 is impossible",
                     "datasets[0].options.normal_dirs': '../../etc' leaves the data set folder"):
        assert expected in text, expected


def test_missing_weights_are_found_by_the_dry_run_with_what_is_available(tmp_path):
    text = str(pytest.raises(wf.ConfigError, wf.load_workflow, _config(models=["padim"], backbone_dir=str(tmp_path)),
                             SCHEMA).value)
    assert "models[0] (padim): no weights for 'resnet18'" in text and "tf_efficientnet_lite0" in text
    assert "overrides: {backbone: tf_efficientnet_lite0}" in text
    wf.load_workflow(_config(models=["padim"], pretrained=False), SCHEMA)  # random weights need no files


def test_categories_on_disk(tmp_path):
    from adlib.data.synthetic import make_dataset

    make_dataset("mvtec", tmp_path / "mv", categories=("bolt", "nut"), n_train=2, n_test_good=1, n_test_bad=1,
                 size=16)
    ds = {"name": "mv", "layout": "mvtec", "root": str(tmp_path / "mv")}
    cfg = wf.validate_config(_config(datasets=[ds]), SCHEMA)
    assert wf.build_run_table(cfg).categories == {"mv": ["bolt", "nut"]}
    cfg = wf.validate_config(_config(datasets=[{**ds, "categories": ["bolt", "screw"]}]), SCHEMA)
    with pytest.raises(wf.ConfigError, match=r"unknown categories \['screw'\].*available categories: bolt, nut"):
        wf.build_run_table(cfg)
    cfg = wf.validate_config(_config(datasets=[{**ds, "root": str(tmp_path / "nowhere")}]), SCHEMA)
    with pytest.raises(wf.ConfigError, match="root folder .*nowhere does not exist"):
        wf.build_run_table(cfg)


# ---------------------------------------------------------------------------------------------- run table
def test_run_table():
    big = MODELS[1]
    models = [MODELS[0], {"name": big, "overrides": {"img_size": 64}}]
    cfg = wf.validate_config(_config(models=models, seeds=[1, 2], img_size=32,
                                     calibration={"method": "calibration", "fraction": 0.3}), SCHEMA)
    table = wf.build_run_table(cfg)
    key = table.prepare_key("syn")
    assert len(table) == 2 * 2 * 2
    assert table.runs[0].run_dir == f"results/runs/syn/widget/{MODELS[0]}/1"
    assert table.manifest("syn", "gear", MODELS[0], "2") == f"results/prepared/syn/{key}/gear/32/manifest.parquet"
    assert table.manifest("syn", "gear", big, 1) == f"results/prepared/syn/{key}/gear/64/manifest.parquet"
    assert table.overrides(MODELS[0]) == {"img_size": 32} and table.overrides(big) == {"img_size": 64}
    assert table.model_name(big) == MODELS[1]
    assert table.train_manifests("syn", "gear", big, 1) == [f"results/prepared/syn/{key}/gear/64/manifest.parquet"]
    assert table.model_file("syn", "gear", big, 1, "config.json") == f"results/runs/syn/gear/{big}/1/config.json"
    assert table.prepare_config("syn") == {"name": "syn", "layout": "synthetic", "root": "results/data/syn",
                                           "options": {}}
    assert table.calibration_fraction() == 0.3
    assert len(table.run_files("metrics.json")) == 8 == len(table.train_files("config.json"))
    maps = [m for m in MODELS if get_spec(m).cls.produces_maps]
    assert table.model_pattern(True) == ("|".join(maps) or "(?!)")
    assert table.model_pattern(False) == ("|".join(m for m in MODELS if m not in maps) or "(?!)")
    assert table.map_files() == [f"{r.run_dir}/maps.npz" for r in table.runs if r.model in maps]
    assert table.category_manifests() == [table.manifest_path("syn", c, 32) for c in ("widget", "gear")]


def test_image_size_follows_the_registered_configuration_unless_overridden():
    models = ["padim", "fastflow-cait",
              {"name": "fastflow-deit", "overrides": {"img_size": 96, "backbone_kwargs": {"img_size": 96}}}]
    table = wf.build_run_table(wf.validate_config(_config(models=models), SCHEMA))
    assert {label: table.img_size(label) for label in table.models} == {"padim": 256, "fastflow-cait": 448,
                                                                          "fastflow-deit": 96}
    key = table.prepare_key("syn")
    assert table.manifest("syn", "widget", "fastflow-cait", 0) == f"results/prepared/syn/{key}/widget/448/manifest.parquet"
    forced = wf.build_run_table(wf.validate_config(_config(models=["padim", models[2]], img_size=64), SCHEMA))
    assert forced.img_size("padim") == 64 and forced.img_size("fastflow-deit") == 96
    text = _error(_config(models=models, img_size=64))  # a size fastflow-cait's transformer cannot take
    assert "config key 'img_size' (forced on models[1], fastflow-cait): backbone cait_m48_448 expects 448x448" in text


def test_dataset_scope_configurations_train_once_per_data_set():
    from adlib.models import registry

    spec = registry.register_variant("padim-scope-test", base="padim", scope="dataset")
    try:
        cfg = wf.validate_config(_config(models=["padim", "padim-scope-test"], results="study1"), SCHEMA)
        table = wf.build_run_table(cfg)
        assert len(table) == 4  # evaluated per category
        shared = [r for r in table.runs if r.model == "padim-scope-test"]
        assert {r.train_dir for r in shared} == {"study1/runs/syn/all/padim-scope-test/0"}
        assert [r.run_dir for r in shared] == ["study1/runs/syn/widget/padim-scope-test/0",
                                               "study1/runs/syn/gear/padim-scope-test/0"]
        key = table.prepare_key("syn")
        assert table.train_manifests("syn", "all", "padim-scope-test", 0) == [
            f"study1/prepared/syn/{key}/widget/256/manifest.parquet", f"study1/prepared/syn/{key}/gear/256/manifest.parquet"]
        assert table.model_file("syn", "gear", "padim-scope-test", 0, "model.safetensors") == \
            "study1/runs/syn/all/padim-scope-test/0/model.safetensors"
        assert len(table.train_files("fit.json")) == 3  # padim x 2 categories + one shared job
    finally:
        registry._REGISTRY.pop(spec.name)


def test_run_settings():
    cfg = wf.validate_config(_config(device="cpu", backbone_dir="weights"), SCHEMA)
    settings = wf.run_settings(cfg, "3")
    assert settings.seed == 3 and settings.device == "cpu" and settings.backbone_dir == Path("weights")


# ---------------------------------------------------------------------------------------------- fingerprints
def test_model_sources_exclude_other_models():
    own = get_spec(MODELS[0]).cls.__module__
    other = get_spec(MODELS[1]).cls.__module__
    files = wf.source_files((own, *wf.TRAIN_SHARED_MODULES), exclude=frozenset({other}))
    assert own in files and other not in files and "adlib.training" in files and "adlib.run.train" in files
    assert "adlib.run.evaluate" not in files and "adlib.evaluation.plots" not in files  # evaluation never retrains
    assert wf.model_fingerprint(MODELS[0]) != wf.model_fingerprint(MODELS[1])


_FINGERPRINT_SCRIPT = """
import json, sys
from pathlib import Path
from adlib.workflow import fingerprints as fp
from adlib.models.registry import get_spec
names = sys.argv[1:3]
def state():
    fp.model_fingerprint.cache_clear(); fp.evaluation_fingerprint.cache_clear(); fp._imports.cache_clear()
    return {**{n: fp.model_fingerprint(n) for n in names}, "eval": fp.evaluation_fingerprint()}
def touch(module):
    path = fp._module_file(module)
    path.write_text(path.read_text() + "\\n# edited\\n")
out = {"root": str(fp._package_root()), "before": state()}
touch(get_spec(names[0]).cls.__module__); out["model_edit"] = state()
touch("adlib.evaluation.plots"); out["eval_edit"] = state()
touch("adlib.training"); out["training_edit"] = state()
print(json.dumps(out))
"""


def test_editing_a_model_file_changes_only_its_fingerprint(tmp_path):
    shutil.copytree(REPO / "adlib", tmp_path / "adlib", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT, *MODELS], env=env, capture_output=True,
                         text=True, check=True, timeout=300, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = MODELS
    assert result["root"] == str(tmp_path / "adlib")
    before, edit, ev, tr = result["before"], result["model_edit"], result["eval_edit"], result["training_edit"]
    assert before[a] == wf.model_fingerprint(a) and before["eval"] == wf.evaluation_fingerprint()
    assert edit[a] != before[a] and edit[b] == before[b] and edit["eval"] == before["eval"]
    assert ev[a] == edit[a] and ev[b] == edit[b] and ev["eval"] != edit["eval"]
    assert tr[a] != ev[a] and tr[b] != ev[b]


# ---------------------------------------------------------------------------------------------- job context
def test_job_context_sends_output_and_errors_to_the_log(tmp_path):
    log = tmp_path / "logs" / "job.log"
    with wf.job_context(log, threads=1):
        print("from python", flush=True)
        os.write(2, b"from the C level\n")
    with pytest.raises(ZeroDivisionError):
        with wf.job_context(log):
            1 / 0  # noqa: B018
    text = log.read_text()
    assert "from python" in text and "from the C level" in text and "ZeroDivisionError" in text
    print("back on stdout")  # the descriptors were restored
