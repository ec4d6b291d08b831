"""The import rules of capplug's source tree, checked on any copy of it (so a test can plant a
violation in a temporary copy and see it reported).

Every import is found: ``import``, ``from ... import``, and a string that names a capplug module
(``importlib.import_module("capplug.x")``, the lazy maps of ``__init__`` files, which hand out a
module's names on first use). Each is checked against three rules:

- **layers**: a package imports only from the layers below its own (and from itself);
- **private modules**: a module whose path has a private segment (``capplug.scoring.precision``)
  is imported only from inside the package that holds that segment;
- **private names**: a private name (``_helper``) is never imported from another module.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
# The package's front door and the test helpers see every layer.
EVERYWHERE = frozenset({"__init__", "__main__", "testing"})

_MODULE_NAME = re.compile(r"^capplug(\.[A-Za-z_]\w*)+$")


@dataclass(frozen=True)
class Import:
    """One import found in a source file: what it names, and how."""

    path: str
    """The importing file, relative to the package root."""
    line: int
    target: str
    """The module imported (``capplug.scoring.precision``)."""
    names: tuple[str, ...] = ()
    """The names taken from it (``from ... import a, b``)."""
    dynamic: bool = False
    """Found as a string (``importlib``, a lazy map), not an import statement."""


def module_of(root: Path, path: Path) -> str:
    """The dotted module name of a file under ``root`` (the ``capplug`` package folder)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["capplug", *parts])


def imports(root: Path) -> Iterator[Import]:
    """Every capplug import of every file under ``root``."""
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        here = module_of(root, path)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: resolved against the file's package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, module] if module else base)
                if module == "capplug" or module.startswith("capplug."):
                    yield Import(rel, node.lineno, module, tuple(a.name for a in node.names))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("capplug."):
                        yield Import(rel, node.lineno, alias.name)
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _MODULE_NAME.match(node.value)
            ):
                yield Import(rel, node.lineno, node.value, dynamic=True)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_module(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` (``capplug.x.y``) is a module or package in the tree at ``root``."""
    rel = Path(*dotted.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def layer_crossings(root: Path) -> list[str]:
    """Imports of a layer at or above the importer's own."""
    found = []
    for imp in imports(root):
        here = Path(imp.path).parts[0].removesuffix(".py")
        if here in EVERYWHERE:
            continue
        if here not in LAYER:
            found.append(f"{imp.path}: place {here!r} in a layer of LAYERS")
            continue
        targets = (
            [f"{imp.target}.{name}" for name in imp.names]
            if imp.target == "capplug"
            else [imp.target]
        )
        for target in targets:
            there = _top(target)
            if there in ("", "__version__") or there == here:
                continue
            if LAYER.get(there, 99) >= LAYER[here]:
                how = " (by name, as a string)" if imp.dynamic else ""
                found.append(f"{imp.path}:{imp.line} imports {target}{how}")
    return found


def private_module_crossings(root: Path) -> list[str]:
    """Imports of a private module (a path segment starting with ``_``) from outside the package
    that holds it."""
    found = []
    for imp in imports(root):
        importer = module_of(root, root / imp.path)
        candidates = [imp.target] + [
            f"{imp.target}.{n}" for n in imp.names if _is_module(root, f"{imp.target}.{n}")
        ]
        for target in candidates:
            parts = target.split(".")
            for i, part in enumerate(parts[1:], 1):
                if part.startswith("_") and not part.endswith("__"):
                    owner = ".".join(parts[:i])  # the package the private module belongs to
                    if importer != owner and not importer.startswith(owner + "."):
                        found.append(f"{imp.path}:{imp.line} imports the private {target}")
                    break
    return found


def private_name_crossings(root: Path) -> list[str]:
    """Private names (``_helper``) imported from another module."""
    found = []
    for imp in imports(root):
        for name in imp.names:
            if not name.startswith("_") or name.endswith("__"):
                continue  # public names, and dunders such as __version__
            if _is_module(root, f"{imp.target}.{name}"):
                continue  # a private module, judged by private_module_crossings
            found.append(f"{imp.path}:{imp.line} imports the private name {imp.target}.{name}")
    return found


def every_crossing(root: Path) -> list[str]:
    """All three rules' findings, for a tree at ``root``."""
    return layer_crossings(root) + private_module_crossings(root) + private_name_crossings(root)
