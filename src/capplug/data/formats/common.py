"""What the format readers share: where a task comes from, reading files with clear errors,
closed label sets, and the family rule."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from capplug.data.tasks import Example, Split, choice_scores
from capplug.errors import DataError


@dataclass(frozen=True, slots=True)
class TaskFile:
    """One task as found in a pool, before it is read: its name, format, files and split."""

    name: str
    source: str
    paths: tuple[Path, ...]
    split: Split = "train"
    family: str = ""
    examples: int | None = None
    """The example count the manifest gives, where there is one."""
    sha256: dict[str, str] = field(default_factory=dict)
    """The manifest's sha256 for each path (as a string), checked when the task is read."""


def read_json(path: Path) -> Any:
    """A JSON file's content; a file that is not JSON is a :class:`DataError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"is the file truncated?"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of a JSONL file as ``(line number, object)``; a line that is not a
    JSON object is a :class:`DataError` naming the file and the line."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(value, dict):
                    raise DataError(
                        f"{path}, line {number}: expected a JSON object; got {type(value).__name__}"
                    )
                yield number, value
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def field_of(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``data[key]`` checked to be of ``kind``; otherwise a :class:`DataError` naming the field."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object; got {type(data).__name__}")
    if key not in data:
        raise DataError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}; got {type(value).__name__}")
    return value


def strings(value: Any, where: str, key: str) -> list[str]:
    """A reference field as a list of strings (a single string is one reference)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [f"{value:g}" if isinstance(value, float) else str(value)]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [v if isinstance(v, str) else strings(v, where, key)[0] for v in value]
    raise DataError(f"{where}: field {key!r} must be a string or a list of strings")


def no_references(path: object, count: int, field: str) -> DataError:
    """The error for a task none of whose ``count`` examples has a reference."""
    if not count:
        return DataError(f"{path}: holds no examples")
    return DataError(
        f"{path}: none of its {count} examples has a reference (every {field!r} is empty)"
    )


MAX_LABELS = 10
"""A task whose references come from at most this many strings is read as a choice among them."""


def with_label_options(examples: list[Example]) -> list[Example]:
    """Examples of a task with a closed label set, each given the set as its options.

    A task is read as choosing among labels when every example has one reference, the references
    take 2 to :data:`MAX_LABELS` distinct values, and each value recurs (at least three examples
    per label on average): P3's classification templates, yes/no and A-D answers. Examples that
    already have options, and tasks that do not qualify, are returned unchanged.
    """
    if not examples or any(e.target_scores is not None for e in examples):
        return examples
    if any(len(e.targets) != 1 for e in examples):
        return examples
    counts = Counter(e.targets[0].strip() for e in examples)
    if not 2 <= len(counts) <= MAX_LABELS or len(examples) < 3 * len(counts):
        return examples
    labels = sorted(counts, key=lambda label: (-counts[label], label))
    return [
        replace(
            e,
            targets=[e.targets[0].strip()],
            target_scores=choice_scores(labels, [e.targets[0].strip()]),
        )
        for e in examples
    ]


_TOKEN = re.compile(r"[_\-/\s]+")


def family_tokens(name: str) -> tuple[str, ...]:
    """A family name as lower-case tokens (split on ``_``, ``-``, ``/`` and spaces)."""
    return tuple(t for t in _TOKEN.split(name.lower()) if t)


def first_token(name: str) -> str:
    """The first token of a name: the dataset of a P3 template or an NI subtask."""
    tokens = family_tokens(name)
    return tokens[0] if tokens else name


def merge_families(families: dict[str, str]) -> dict[str, str]:
    """Map each task's family to the shortest family it shares a dataset with.

    Families of different sources name one dataset at different depths (``logical_deduction``
    and BBH's ``logical_deduction_three_objects``; ``formal_fallacies`` and
    ``formal_fallacies_syllogisms_negation``); two families are one when the tokens of the
    shorter begin the longer's. ``families`` maps task name to family; the result too.
    """
    distinct = sorted({family_tokens(f) for f in families.values() if f}, key=len)
    canon: dict[tuple[str, ...], tuple[str, ...]] = {}
    for tokens in distinct:
        for shorter in canon:
            if len(shorter) < len(tokens) and tokens[: len(shorter)] == shorter:
                canon[tokens] = canon[shorter]
                break
        else:
            canon[tokens] = tokens
    return {task: "_".join(canon[family_tokens(f)]) if f else task for task, f in families.items()}
