"""The registry's metadata as a JSON file, readable without importing torch or building models,
so ``adlib --help``, ``adlib list-models`` and name/option errors answer at once.

``index.json`` is generated from the live registry (``python -m adlib.models.index``) and a
test fails when it is out of date. Per configuration: family, description, paper, scope,
train_labels, aliases, model and training defaults, the weight files it loads and the
auxiliary image sets it cannot train without.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

INDEX_FILE = Path(__file__).with_name("index.json")


def build_index() -> dict[str, Any]:
    """The metadata of every registered configuration (imports every model module)."""
    from adlib.models.checks import requirements
    from adlib.models.registry import aliases_of, get_spec, list_models, resolve_config

    index = {}
    for name in list_models():
        spec, config = get_spec(name), resolve_config(name)
        needs = requirements(name)
        index[name] = {
            "family": spec.family, "description": spec.description, "paper": spec.paper, "scope": spec.scope,
            "train_labels": spec.train_labels, "aliases": aliases_of(name), "model": config.model,
            "train": config.train, "weights": list(needs.weights),
            "auxiliary": [dataclasses.asdict(s) for s in needs.streams if s.fallback is None],
        }
    return index


def load_index() -> dict[str, Any]:
    return json.loads(INDEX_FILE.read_text(encoding="utf-8"))


def canonical(name: str, index: dict[str, Any]) -> str | None:
    """The configuration ``name`` (or an alias of it) stands for, or None."""
    if name in index:
        return name
    return next((n for n, entry in index.items() if name in entry["aliases"]), None)


def render() -> str:
    return json.dumps(build_index(), indent=1, sort_keys=True, default=str) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when index.json is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = INDEX_FILE.read_text(encoding="utf-8") if INDEX_FILE.is_file() else ""
        if current != text:
            print(f"{INDEX_FILE} is out of date: run `python -m adlib.models.index`", file=sys.stderr)
            return 1
        return 0
    from adlib.io import write_text

    write_text(INDEX_FILE, text)
    print(f"wrote {INDEX_FILE} ({len(json.loads(text))} configurations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
