"""Source fingerprints: Snakemake does not see edits of an installed library, so each rule gets
a hash of the adlib sources that decide its result as a param."""
from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path
from typing import Mapping

#: Modules (besides the model's own file and what it imports) whose edits retrain every model.
TRAIN_SHARED_MODULES = ("adlib.training", "adlib.artifacts", "adlib.models.base", "adlib.models.registry",
                        "adlib.data", "adlib.run.train")
#: Modules whose edits re-evaluate every run.
EVAL_SHARED_MODULES = ("adlib.run.evaluate", "adlib.evaluation")
#: Modules never followed when collecting a model's sources: importing them pulls in every model.
_NOT_FOLLOWED = {"adlib", "adlib.models"}


def _package_root() -> Path:
    import adlib

    return Path(adlib.__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    """Source file of ``module`` (``adlib.*`` resolved on disk without importing it)."""
    if module == "adlib" or module.startswith("adlib."):
        base = _package_root().joinpath(*module.split(".")[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    loaded = sys.modules.get(module)
    path = getattr(loaded, "__file__", None)
    return Path(path) if path else None


@functools.lru_cache(maxsize=None)
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """The ``adlib`` modules a source file imports (at any depth of the file, lazy imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # names may be submodules
    return tuple(sorted(m for m in found if m == "adlib" or m.startswith("adlib.")))


def _package_modules(module: str) -> list[str]:
    """A package stands for every module file inside it."""
    path = _module_file(module)
    if path is None or path.name != "__init__.py":
        return [module]
    return [f"{module}.{'.'.join(p.relative_to(path.parent).with_suffix('').parts)}".removesuffix(".__init__")
            for p in sorted(path.parent.rglob("*.py"))]


def source_files(roots: tuple[str, ...], exclude: frozenset[str] = frozenset()) -> dict[str, Path]:
    """Module -> file for ``roots`` and every ``adlib`` module they import, transitively.

    Modules in ``exclude`` (and the ``adlib`` / ``adlib.models`` package files, which import every
    model) are not followed.
    """
    todo = [m for root in roots for m in _package_modules(root)]
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        if module in seen or module in exclude or module in _NOT_FOLLOWED:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen[module] = path
        todo.extend(_imports(path, module))
    return seen


def _digest(files: Mapping[str, Path]) -> str:
    digest = hashlib.sha256()
    for module in sorted(files):
        digest.update(module.encode())
        digest.update(hashlib.sha256(files[module].read_bytes()).digest())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def model_fingerprint(name: str) -> str:
    """Hash of the sources that decide how model ``name`` trains and predicts.

    Its own module, every ``adlib`` module that one imports (components, backbones ...), and the
    shared training modules; other model files are excluded, so editing one model file changes
    only that model's fingerprint.
    """
    from adlib.models.registry import get_spec, list_models

    own = get_spec(name).cls.__module__
    others = frozenset(get_spec(n).cls.__module__ for n in list_models()) - {own}
    return _digest(source_files((own, *TRAIN_SHARED_MODULES), exclude=others, ))


@functools.lru_cache(maxsize=None)
def evaluation_fingerprint() -> str:
    """Hash of the evaluation sources (metrics, thresholds, plots, the pipeline's evaluate step)."""
    from adlib.models.registry import get_spec, list_models

    models = frozenset(get_spec(n).cls.__module__ for n in list_models())
    return _digest(source_files(EVAL_SHARED_MODULES, exclude=models))


