"""BIG-bench task JSON (and BIG-Bench Hard, which is BIG-bench examples without the settings),
with prompts built exactly as BIG-bench builds them (``bigbench/api/json_task.py``)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from capplug.data.formats.common import TaskFile, read_json, with_label_options
from capplug.data.tasks import Example, Split, Task, choice_scores
from capplug.errors import DataError

# BIG-bench's own defaults (bigbench/api/json_task.py, JsonTask.load_and_process_json).
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
# JsonTask's default random_seed; default_format_fn re-seeds it for every example.
_CHOICE_SEED = 42
_EXAMPLE_FIELDS = frozenset({"input", "target", "target_scores"})
# BIG-Bench Hard lists a multiple-choice example's options in its input: "Options:\n(A) ...".
_BBH_OPTION = re.compile(r"^\(([A-Z])\)\s", re.MULTILINE)


def parse_task(
    name: str,
    data: Mapping[str, Any],
    *,
    source: str = "bigbench",
    family: str = "",
    split: Split = "train",
    path: str = "",
) -> Task:
    """Build a :class:`Task` from the parsed JSON of one BIG-bench ``task.json``.

    The instruction is the ``task_prefix`` (BIG-bench's natural_instructions subtasks keep their
    definition there), else the ``description``.
    """
    where = path or f"task {name!r}"
    if not isinstance(data, Mapping):
        raise DataError(f"{where}: expected a JSON object; got {type(data).__name__}")
    raw_examples = data.get("examples")
    if not isinstance(raw_examples, list):
        raise DataError(
            f"{where}: has no 'examples' list (a container task? name one of its subtasks)"
        )
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = data.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    choice_prefix = data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
    # As BIG-bench applies it: the raw value's truthiness (the string "false" counts as true).
    append_choices = bool(data.get("append_choices_to_input", True))

    examples: list[Example] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_examples):
        # BIG-bench drops exact duplicates, keeping the first; ids stay file positions.
        key = json.dumps(raw)
        if key in seen:
            continue
        seen.add(key)
        examples.append(
            _parse_example(
                name,
                index,
                raw,
                where=where,
                task_prefix=task_prefix,
                input_prefix=input_prefix,
                output_prefix=output_prefix,
                choice_prefix=choice_prefix,
                append_choices=append_choices,
            )
        )
    description = str(data.get("description", ""))
    return Task(
        name=name,
        examples=examples,
        source=source,
        family=family,
        split=split,
        instruction=task_prefix.strip() or description.strip(),
        instructions=tuple(t for t in (task_prefix.strip(), description.strip()) if t),
        description=description,
        metrics=[str(m) for m in data.get("metrics", [])],
        path=path,
        dropped=len(raw_examples) - len(examples),
    )


def read_bigbench(entry: TaskFile) -> Task:
    """One ``task.json`` of a BIG-bench folder (or of the extracted sdist)."""
    (path,) = entry.paths
    return parse_task(
        entry.name,
        read_json(path),
        family=entry.family,
        split=entry.split,
        path=str(path),
    )


def read_bbh(entry: TaskFile) -> Task:
    """One BIG-Bench Hard file: BIG-bench's prompt format; options from the input's
    ``Options:`` list, or the task's closed label set (True/False, Yes/No, valid/invalid)."""
    (path,) = entry.paths
    task = parse_task(
        entry.name,
        read_json(path),
        source="bbh",
        family=entry.family,
        split=entry.split,
        path=str(path),
    )
    examples = [_bbh_options(e) for e in task.examples]
    return replace(task, examples=with_label_options(examples), instruction="")


def _bbh_options(example: Example) -> Example:
    _, sep, listed = example.input.rpartition("Options:")
    letters = _BBH_OPTION.findall(listed) if sep else []
    target = example.targets[0].strip() if len(example.targets) == 1 else ""
    options = [f"({letter})" for letter in letters]
    if len(options) < 2 or target not in options:
        return example
    return replace(example, targets=[target], target_scores=choice_scores(options, [target]))


def _parse_example(
    task: str,
    index: int,
    raw: Any,
    *,
    where: str,
    task_prefix: str,
    input_prefix: str,
    output_prefix: str,
    choice_prefix: str,
    append_choices: bool,
) -> Example:
    where = f"{where}, example {index}"
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
        raise DataError(f"{where}: expected an object with a string 'input'")
    if "target" not in raw and "target_scores" not in raw:
        raise DataError(f"{where}: has neither 'target' nor 'target_scores' (no references)")
    text = raw["input"]
    scores: dict[str, float] | None = None
    if "target_scores" in raw:
        if not isinstance(raw["target_scores"], dict):
            raise DataError(f"{where}: field 'target_scores' must be an object")
        try:
            scores = {str(k): float(v) for k, v in raw["target_scores"].items()}
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: field 'target_scores' must map options to numbers") from exc
        if not scores:
            raise DataError(f"{where}: 'target_scores' is empty")
        if append_choices:
            ordered = sorted(scores)
            shown = [ordered[i] for i in _choice_order(len(ordered))]
            text = text + choice_prefix + choice_prefix.join(shown)
    if "target" in raw:
        target = raw["target"]
        targets = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        if not targets:
            raise DataError(f"{where}: 'target' is an empty list (no references)")
    else:
        assert scores is not None
        best = max(scores.values())
        targets = [option for option, score in scores.items() if score == best]
    query = input_prefix + text + output_prefix
    return Example(
        task=task,
        index=index,
        input=raw["input"],
        prompt=task_prefix + query,
        targets=targets,
        target_scores=scores,
        metadata={k: v for k, v in raw.items() if k not in _EXAMPLE_FIELDS},
    )


@functools.lru_cache(maxsize=256)
def _choice_order(count: int) -> tuple[int, ...]:
    # default_format_fn permutes the sorted options with a fresh RandomState(42) per example,
    # so the order depends only on how many options there are.
    return tuple(int(i) for i in np.random.RandomState(seed=_CHOICE_SEED).permutation(count))
