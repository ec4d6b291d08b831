"""One reader per task-data format, and how a folder's files are recognised as tasks.

A folder is read through its ``manifest.json`` when it has one (each task's path, split and,
optionally, source, name, example count and sha256), or else recognised by layout: a
``task.json`` is a BIG-bench task; a ``.json`` file with ``Definition`` and ``Instances`` is a
Natural Instructions task (v1 when the definition is a string, Super-NaturalInstructions when a
list); ``annotations``/``induce``/``execute`` folders hold instruction-induction tasks; a
``.json`` file with only ``examples`` of ``input``/``target`` is BIG-Bench Hard; a ``.jsonl``
file of ``prompt``/``completion`` lines is a P3 template, and one of ``instruction``/``input``/
``references`` lines is a user's own task.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from capplug.data.formats.bigbench_json import parse_task, read_bbh, read_bigbench
from capplug.data.formats.common import TaskFile, first_token, merge_families, read_json
from capplug.data.formats.instructions import (
    ni_prompt,
    read_instruction_induction,
    read_natural_instructions,
)
from capplug.data.formats.prompts import read_jsonl_task, read_p3, template_of
from capplug.data.tasks import SPLITS, Task
from capplug.errors import DataError

__all__ = [
    "MANIFEST",
    "READERS",
    "SOURCES",
    "TaskFile",
    "discover",
    "ni_prompt",
    "parse_task",
    "read_task",
    "template_of",
]

MANIFEST = "manifest.json"

READERS: dict[str, Callable[[TaskFile], Task]] = {
    "bigbench": read_bigbench,
    "bbh": read_bbh,
    "natural_instructions_v1": read_natural_instructions,
    "super_natural_instructions": read_natural_instructions,
    "p3": read_p3,
    "instruction_induction": read_instruction_induction,
    "jsonl": read_jsonl_task,
}
SOURCES = tuple(READERS)
"""Every format capplug reads, by the name a task's ``source`` carries."""

_II_PARTS = ("annotations", "induce", "execute")
_PEEK = 1 << 16
_NUMBERED = re.compile(r"^(sub)?task\d+_")
_SNI_SOURCE = re.compile(r'"Source"\s*:\s*\[\s*"([^"]+)"')
_SKIP_NAMES = frozenset({MANIFEST, "README.md", "LICENSE", "splits.json"})


def read_task(entry: TaskFile) -> Task:
    """Read one task with its format's reader; a bad file is a :class:`DataError` naming it."""
    return READERS[entry.source](entry)


def discover(root: Path) -> tuple[list[TaskFile], list[tuple[str, str]]]:
    """The tasks in ``root`` (through its manifest, or by layout) and the files passed over,
    each as ``(path, why)``. Nothing is parsed beyond the first bytes of a file."""
    if (root / MANIFEST).is_file():
        entries, skipped = _from_manifest(root)
    else:
        entries, skipped = _by_layout(root)
    families = merge_families({e.name: e.family for e in entries})
    return [replace(e, family=families[e.name]) for e in entries], skipped


def _from_manifest(root: Path) -> tuple[list[TaskFile], list[tuple[str, str]]]:
    path = root / MANIFEST
    data = read_json(path)
    rows = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected an object with a 'tasks' list")
    skipped: list[tuple[str, str]] = []
    found: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(rows):
        where = f"{path}, tasks[{number}]"
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            skipped.append((where, "expected an object with a string 'path'"))
            continue
        file = (root / row["path"]).resolve()
        split = row.get("split", "train")
        if split not in SPLITS:
            skipped.append((str(file), f"split {split!r} is not one of {', '.join(SPLITS)}"))
            continue
        if not file.is_file():
            skipped.append((str(file), "listed in the manifest but missing"))
            continue
        source = str(row.get("source") or "")
        guess = None
        if not source or source.startswith("instruction_induction/") or not row.get("task"):
            guess = _recognise(root, file)
            source = guess[0] if guess else source
        if source not in READERS:
            skipped.append((str(file), f"source {source!r} is not a format capplug reads"))
            continue
        name = _name(source, str(row.get("task") or "") or (guess[1] if guess else file.stem))
        entry = found.setdefault(
            name,
            {
                "name": name,
                "source": source,
                "paths": [],
                "split": split,
                "examples": 0,
                "sha256": {},
                "family": _family(source, name, file),
            },
        )
        entry["paths"].append(file)
        if isinstance(row.get("sha256"), str):
            entry["sha256"][str(file)] = row["sha256"]
        if isinstance(row.get("examples"), int) and (
            source != "instruction_induction" or file.parent.name != "annotations"
        ):
            entry["examples"] += row["examples"]
    entries = [TaskFile(**{**e, "paths": tuple(e["paths"])}) for e in found.values()]
    return entries, skipped


def _by_layout(root: Path) -> tuple[list[TaskFile], list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    found: dict[str, dict[str, Any]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file_name in sorted(files):
            if file_name.startswith(".") or file_name in _SKIP_NAMES:
                continue
            file = Path(folder) / file_name
            try:
                guess = _recognise(root, file)
            except DataError as exc:
                skipped.append((str(file), str(exc).removeprefix(f"{file}: ")))
                continue
            if guess is None:
                if file.suffix in (".json", ".jsonl"):
                    skipped.append((str(file), "not a task file of any format capplug reads"))
                continue
            source, task = guess
            name = _name(source, task)
            entry = found.setdefault(
                name,
                {
                    "name": name,
                    "source": source,
                    "paths": [],
                    "split": "train",
                    "family": _family(source, name, file),
                },
            )
            entry["paths"].append(file)
    entries = [TaskFile(**{**e, "paths": tuple(e["paths"])}) for e in found.values()]
    return sorted(entries, key=lambda e: e.name), skipped


def _name(source: str, task: str) -> str:
    """A task's name in its pool: its source, then its path below that source's folder."""
    return f"{source}/{task}" if source != "jsonl" else task


def _recognise(root: Path, file: Path) -> tuple[str, str] | None:
    """``(source, task)`` for a file, judged by its place and its first bytes; ``None`` when
    it is no task file."""
    rel = file.relative_to(root) if file.is_relative_to(root) else Path(file.name)
    parts = rel.parts
    if file.name == "task.json":
        below = parts[:-1]
        if below and below[0] == "bigbench":
            below = below[1:]
        return "bigbench", "/".join(below) or file.parent.name
    if file.suffix == ".jsonl":
        head = _first_line(file)
        if head is None:
            return None
        if "prompt" in head and "completion" in head:
            return "p3", _below(parts, "p3")
        if {"references", "instruction", "input", "options"} & set(head):
            return "jsonl", _below(parts, "")
        return None
    if file.suffix != ".json":
        return None
    if file.parent.name in _II_PARTS:
        return "instruction_induction", file.stem
    head = _peek(file)
    if '"Instances"' in head and '"Definition"' in head:
        source = (
            "natural_instructions_v1"
            if re.search(r'"Definition"\s*:\s*"', head)
            else "super_natural_instructions"
        )
        return source, _below(parts, source)
    if '"examples"' in head:
        return "bbh", _below(parts, "bbh")
    return None


def _below(parts: tuple[str, ...], source: str) -> str:
    """A file's path without its source folder (when it has one) and without its suffix."""
    if source and parts and parts[0] == source:
        parts = parts[1:]
    return str(Path(*parts).with_suffix("")) if parts else ""


def _family(source: str, name: str, file: Path) -> str:
    """The dataset a task belongs to, before families of different sources are merged."""
    task = name.partition("/")[2] if source != "jsonl" else name
    if source == "bigbench":
        return task.split("/")[0]
    if source == "bbh":
        return task
    if source == "super_natural_instructions":
        found = _SNI_SOURCE.search(_peek(file))
        if found:
            return found.group(1)
        return _NUMBERED.sub("", task).removeprefix("bbh_")
    if source in ("natural_instructions_v1", "p3", "instruction_induction"):
        return first_token(_NUMBERED.sub("", task))
    return task


def _peek(file: Path) -> str:
    try:
        with open(file, "rb") as handle:
            return handle.read(_PEEK).decode("utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc.strerror or exc})") from exc


def _first_line(file: Path) -> dict[str, Any] | None:
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    value = json.loads(line)
                    return value if isinstance(value, dict) else None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: line 1 is not valid JSON ({exc.msg})") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc.strerror or exc})") from exc
    return None
