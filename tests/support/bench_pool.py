"""A small task pool the benchmark tests write themselves: BIG-bench and Natural Instructions v1
task files laid out as ``../shared/data`` is, with a ``manifest.json`` that marks each task's
split (so a test's dev tasks are named as the dev lists name them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Split = Literal["train", "dev"]


def choice_task(inputs: list[str], options: list[str], *, prefix: str = "") -> dict[str, Any]:
    """A BIG-bench multiple-choice task: each input with ``options``, the first one correct."""
    return {
        "name": "toy",
        "description": "A made-up multiple-choice task.",
        "metrics": ["multiple_choice_grade"],
        "task_prefix": prefix,
        "examples": [
            {"input": text, "target_scores": {o: float(i == 0) for i, o in enumerate(options)}}
            for text in inputs
        ],
    }


def generation_task(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """A BIG-bench generative task of ``(input, target)`` pairs."""
    return {
        "name": "toy",
        "description": "A made-up generative task.",
        "metrics": ["exact_str_match"],
        "examples": [{"input": text, "target": target} for text, target in pairs],
    }


def ni_task(definition: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """A Natural Instructions v1 task: a definition and ``(input, output)`` instances."""
    return {
        "Title": "toy",
        "Prompt": definition,
        "Definition": definition,
        "Things to Avoid": "-",
        "Emphasis & Caution": "-",
        "Examples": {"Positive Examples": [], "Negative Examples": []},
        "Instances": [{"input": text, "output": [output]} for text, output in pairs],
    }


def write_pool(root: Path, tasks: dict[str, tuple[Split, dict[str, Any]]]) -> Path:
    """Write each task (named ``bigbench/<task>`` or ``natural_instructions_v1/<task>``, as the
    pool names it) with its split under ``root``, and a ``manifest.json`` listing them."""
    rows = []
    for name, (split, data) in tasks.items():
        source, _, task = name.partition("/")
        if source == "bigbench":
            relative = f"bigbench/{task}/task.json"
        elif source == "natural_instructions_v1":
            relative = f"natural_instructions_v1/{task}.json"
        else:
            raise ValueError(
                f"write_pool writes bigbench and natural_instructions_v1 tasks; {name!r}"
            )
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")
        rows.append({"source": source, "task": task, "split": split, "path": relative})
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"tasks": rows}), encoding="utf-8")
    return root
