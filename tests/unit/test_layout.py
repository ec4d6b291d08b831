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


def test_every_default_model_name_is_defined_once():
    from capplug import models

    names = [models.DEFAULT_SCORER, models.DEFAULT_CHAT_MODEL, models.DEFAULT_HYPERNETWORK]
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "models.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(
                    f"{path.relative_to(SRC)}:{node.lineno} repeats {node.value!r}"
                )
