"""`adlib --help`, `adlib list-models` and name errors answer without importing torch or any
model (from the registry index), and the index matches the live registry."""
from __future__ import annotations

import json
import subprocess
import sys

from adlib.models import index


def _imports_torch(code: str) -> tuple[bool, str]:
    probe = f"import sys\n{code}\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().endswith("TORCH") and not done.stdout.strip().endswith("NO-TORCH"), done.stdout


def test_help_list_models_and_name_errors_do_not_import_torch():
    for code in ("from adlib.cli import build_parser; build_parser().format_help()",
                 "from adlib.cli import main; main(['list-models', '--pattern', 'padim'])",
                 "from adlib.cli import main; main(['list-models', '--runnable', '--json'])",
                 "from adlib.cli import main; assert main(['train', 'mvtec', 'bottle', 'padimm']) == 2",
                 "from adlib.cli import main; assert main(['train', 'mvtec', 'bottle', 'padim', '--set', 'x=1']) == 2"):
        torch, out = _imports_torch(code)
        assert not torch, f"{code} imported torch:\n{out}"


def test_list_models_says_what_runs_now(capsys):
    from adlib.cli import main

    assert main(["list-models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["padim"]["runnable"] is False and rows["padim"]["missing"] == ["weights resnet18"]
    assert rows["draem"]["runnable"] is True and rows["padim"]["description"]
    assert main(["list-models", "--runnable", "--json"]) == 0
    assert "draem" in {r["name"] for r in json.loads(capsys.readouterr().out)}


def test_the_registry_index_is_current():
    assert index.main(["--check"]) == 0, "run `python -m adlib.models.index` after changing a registration"
