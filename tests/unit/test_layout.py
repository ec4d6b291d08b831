"""Rules of the source tree that a reader relies on."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import capplug

SRC = Path(capplug.__file__).parent


def test_no_private_name_is_imported_from_another_module():
    crossings = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                "capplug"
            ):
                continue
            for alias in node.names:
                if not alias.name.startswith("_") or alias.name.endswith("__"):
                    continue  # public names, and dunders such as __version__
                # A private module shared inside its package (serve._chat, say) is fine.
                if importlib.util.find_spec(f"{node.module}.{alias.name}") is not None:
                    continue
                crossings.append(f"{path.relative_to(SRC)}: {node.module}.{alias.name}")
    assert crossings == []


# What a path may touch: a package imports only from the layers below its own (and from itself).
LAYERS = [
    {"errors"},
    {"_cache", "_runtime"},
    {"models", "chat"},
    {"llms", "feedback"},
    {"data"},
    {"scoring"},
    {"adapters"},
    {"selection"},
    {"training"},
    {"serve"},
    {"cli"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_imports_only_the_layers_below_it():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        here = rel.parts[0].removesuffix(".py")
        if here in ("__init__", "__main__", "testing"):
            continue  # the package's lazy front door and the test helpers see everything
        assert here in LAYER, f"{rel}: place {here!r} in a layer of LAYERS"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("capplug"):
                targets = [
                    f"{node.module}.{a.name}" if node.module == "capplug" else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("capplug.")]
            else:
                continue
            for target in targets:
                there = _top(target)
                if there in ("", "__version__") or there == here:
                    continue
                if LAYER.get(there, 99) >= LAYER[here]:
                    upward.append(f"{rel}:{node.lineno} imports {target}")
    assert upward == []


def test_every_default_model_name_is_defined_once():
    from capplug import models

    names = [models.DEFAULT_SCORER, models.DEFAULT_CHAT_MODEL, models.DEFAULT_HYPERNETWORK]
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "models" / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(
                    f"{path.relative_to(SRC)}:{node.lineno} repeats {node.value!r}"
                )


MAX_MODULE_LINES = 600


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {
        str(path.relative_to(SRC)): n
        for path in SRC.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these by concern (at most {MAX_MODULE_LINES} lines each): {long}"


def test_unit_tests_mirror_the_packages():
    unit = Path(__file__).parent
    folders = {p.name for p in unit.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    # bench/ holds the benchmark scripts' own tests (the benchmarks package sits beside src).
    assert folders - {"bench"} <= packages, f"test folders with no package: {folders - packages}"
    assert not [p.name for p in unit.glob("test_*.py") if p.stem[5:] in packages]
