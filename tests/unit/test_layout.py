"""Rules of the source tree that a reader relies on."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from import_rules import (
    every_crossing,
    layer_crossings,
    private_module_crossings,
    private_name_crossings,
)

import capplug

SRC = Path(capplug.__file__).parent


def test_no_private_name_is_imported_from_another_module():
    assert private_name_crossings(SRC) == []


def test_a_private_module_is_imported_only_inside_its_package():
    assert private_module_crossings(SRC) == []


def test_every_package_imports_only_the_layers_below_it():
    # Imports by name as a string (importlib, the lazy maps of __init__ files) count too.
    assert layer_crossings(SRC) == []


PLANTED = {
    "a private module from another package": (
        "training/planted.py",
        "from capplug.scoring._checkpoint import load\n",
        "imports the private capplug.scoring._checkpoint",
    ),
    "a private module, imported as a name": (
        "training/planted.py",
        "from capplug.scoring import _checkpoint\n",
        "imports the private capplug.scoring._checkpoint",
    ),
    "a private function": (
        "training/planted.py",
        "from capplug.scoring.model import _helper\n",
        "imports the private name capplug.scoring.model._helper",
    ),
    "a higher layer, through importlib": (
        "data/planted.py",
        'import importlib\nimportlib.import_module("capplug.serve.proxy")\n',
        "imports capplug.serve.proxy (by name, as a string)",
    ),
    "a higher layer, through a lazy map": (
        "scoring/planted.py",
        '_LAZY = {"Reranker": "capplug.selection.core"}\n',
        "imports capplug.selection.core (by name, as a string)",
    ),
    "a higher layer, relatively": (
        "data/planted.py",
        "from ..training import scorer\n",
        "imports capplug.training",
    ),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_violation_is_reported(tmp_path: Path, case: str) -> None:
    relative, code, expected = PLANTED[case]
    tree = tmp_path / "capplug"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    assert every_crossing(tree) == []  # the copy is clean
    (tree / relative).write_text(code)
    found = every_crossing(tree)
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith(relative)


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


def _lazy_map(tree: ast.Module) -> dict[str, str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in ("_EXPORTS", "_LAZY"):
                return ast.literal_eval(node.value)
    return None


def _type_checking_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for inner in node.body:
                if isinstance(inner, ast.ImportFrom):
                    names |= {alias.asname or alias.name for alias in inner.names}
    return names


def test_every_lazily_imported_name_is_imported_for_type_checkers_too():
    # A name handed out on first use is also imported under TYPE_CHECKING, so editors,
    # type checkers and the layer check above follow it to where it is defined.
    missing = {}
    for init in sorted(SRC.rglob("__init__.py")):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        lazy = _lazy_map(tree)
        if lazy is None:
            continue
        if absent := sorted(set(lazy) - _type_checking_imports(tree)):
            missing[str(init.relative_to(SRC))] = absent
    assert not missing, f"import these under `if TYPE_CHECKING:` too: {missing}"


MAX_FUNCTION_LINES = 80


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, its docstring left out (an Args section documents, it does not
    make the function harder to follow)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    value = first.value if isinstance(first, ast.Expr) else None
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_is_longer_than_a_page():
    long = {
        f"{path.relative_to(SRC)}:{node.lineno} {node.name}": n
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n := _code_lines(node)) > MAX_FUNCTION_LINES
    }
    assert not long, (
        f"split these (at most {MAX_FUNCTION_LINES} lines besides the docstring): {long}"
    )


def test_unit_tests_mirror_the_packages():
    unit = Path(__file__).parent
    folders = {p.name for p in unit.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    # bench/ holds the benchmark scripts' own tests (the benchmarks package sits beside src).
    assert folders - {"bench"} <= packages, f"test folders with no package: {folders - packages}"
    assert not [p.name for p in unit.glob("test_*.py") if p.stem[5:] in packages]
