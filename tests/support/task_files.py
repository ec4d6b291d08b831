"""A tiny task pool written by the tests themselves: one task of every format capplug reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BIGBENCH = {
    "name": "anachronisms",
    "description": "Identify anachronisms",
    "metrics": ["multiple_choice_grade"],
    "task_prefix": "Read this.\n",
    "examples": [
        {"input": "Caesar used a phone.", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Caesar used a sword.", "target_scores": {"Yes": 0, "No": 1}},
        {"input": "Caesar used a sword.", "target_scores": {"Yes": 0, "No": 1}},
    ],
}
BIGBENCH_SUBTASK = {
    "name": "1_digit_addition",
    "description": "1-digit addition.",
    "metrics": ["exact_str_match"],
    "examples": [{"input": f"What is {i} plus 1?", "target": str(i + 1)} for i in range(4)],
}
BBH = {
    "canary": "canary",
    "examples": [
        {
            "input": f"Which is right?\nOptions:\n(A) red {i}\n(B) blue {i}",
            "target": "(A)" if i % 2 else "(B)",
        }
        for i in range(3)
    ],
}
BBH_BOOLEAN = {
    "canary": "canary",
    "examples": [
        {"input": f"{'not ' * i}True is", "target": "True" if i % 2 == 0 else "False"}
        for i in range(6)
    ],
}
NI_V1 = {
    "Title": "Question typing",
    "Prompt": "Say what the question asks for.",
    "Definition": "Say whether the question asks about a person or a place",
    "Things to Avoid": "-",
    "Emphasis & Caution": "-",
    "Examples": {"Positive Examples": [], "Negative Examples": []},
    "Instances": [
        {"input": f"Who is {i}?" if i % 2 else f"Where is {i}?", "output": [label]}
        for i, label in enumerate(["place", "person"] * 4)
    ]
    + [{"input": "Unanswered?", "output": []}],
}
SNI = {
    "Contributors": ["x"],
    "Source": ["ted"],
    "Categories": ["Translation"],
    "Definition": ["Translate the sentence into French."],
    "Positive Examples": [],
    "Negative Examples": [],
    "Instances": [
        {"id": "t1-1", "input": "Hello.", "output": ["Bonjour."]},
        {"id": "t1-2", "input": "Thank you.", "output": ["Merci.", "Merci bien."]},
    ],
}
P3_LINES = [
    {
        "prompt": f"Review: great film {i}\nIs this review positive?\n",
        "completion": f"{a}<|endoftext|>",
    }
    for i, a in enumerate(["Yes", "No"] * 3)
] + [{"prompt": "Review: ?\nIs this review positive?\n", "completion": "<|endoftext|>"}]
II = {
    "annotations": {"annotations": ["Write the opposite word.", "Give an antonym."]},
    "induce": {"examples": {"1": {"input": "hot", "output": "cold"}}},
    "execute": {
        "examples": {
            "1": {"input": "up", "output": "down"},
            "2": {"input": "big", "output": "small"},
        }
    },
}
JSONL_LINES = [
    {"instruction": "Name the capital.", "input": "France", "references": ["Paris"]},
    {
        "instruction": "Name the capital.",
        "input": "Australia",
        "options": ["Sydney", "Canberra"],
        "correct": 1,
    },
]


def _json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def write_pool(root: Path, *, manifest: bool = True, dev: tuple[str, ...] = ()) -> Path:
    """One task of every format under ``root`` (laid out as ``../shared/data`` is), with a
    ``manifest.json`` listing each file's source, task, split and sha256 when ``manifest``;
    ``dev`` names the manifest tasks (as ``source/task``) to mark ``dev``."""
    files = [
        ("bigbench", "anachronisms", _json(root / "bigbench/anachronisms/task.json", BIGBENCH)),
        (
            "bigbench",
            "arithmetic/1_digit_addition",
            _json(root / "bigbench/arithmetic/1_digit_addition/task.json", BIGBENCH_SUBTASK),
        ),
        ("bbh", "hyperbaton", _json(root / "bbh/hyperbaton.json", BBH)),
        ("bbh", "boolean_expressions", _json(root / "bbh/boolean_expressions.json", BBH_BOOLEAN)),
        (
            "natural_instructions_v1",
            "subtask046_question_typing",
            _json(root / "natural_instructions_v1/subtask046_question_typing.json", NI_V1),
        ),
        (
            "super_natural_instructions",
            "task1_ted_translation",
            _json(root / "super_natural_instructions/task1_ted_translation.json", SNI),
        ),
        ("p3", "imdb_is_positive", _jsonl(root / "p3/imdb_is_positive.jsonl", P3_LINES)),
    ]
    for part, data in II.items():
        path = _json(root / f"instruction_induction/{part}/antonyms.json", data)
        files.append((f"instruction_induction/{part}", "antonyms", path))
    if manifest:
        rows = []
        for source, task, path in files:
            name = f"{source.split('/')[0]}/{task}"
            rows.append(
                {
                    "source": source,
                    "task": task,
                    "split": "dev" if name in dev else "train",
                    "path": path.relative_to(root).as_posix(),
                    "examples": 1,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            )
        _json(root / "manifest.json", {"tasks": rows})
    return root


def write_jsonl_task(path: Path, lines: list[dict[str, Any]] | None = None) -> Path:
    """A user's own task as JSONL (instruction, input, references; options with correct)."""
    return _jsonl(path, JSONL_LINES if lines is None else lines)
