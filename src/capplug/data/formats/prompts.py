"""Tasks given as prompts and completions: P3 (PromptSource) templates and a user's own JSONL."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from typing import Any

from capplug.data.formats.common import (
    TaskFile,
    no_references,
    read_jsonl,
    strings,
    with_label_options,
)
from capplug.data.tasks import Example, Task, choice_scores
from capplug.errors import DataError

P3_END = "<|endoftext|>"
_MIN_TEMPLATE_CHARS = 12


def read_p3(entry: TaskFile) -> Task:
    """One P3 template file: ``{"prompt", "completion"}`` lines, the prompt as written, the
    completion (without its end marker) the reference. A classification template's labels are
    its options. The instruction is the template text the prompts share (their common start and
    end), where they share enough of it, and an example's input is the rest of its prompt."""
    (path,) = entry.paths
    examples = []
    lines = 0
    for number, line in read_jsonl(path):
        lines += 1
        where = f"{path}, line {number}"
        prompt = line.get("prompt")
        completion = line.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: expected string fields 'prompt' and 'completion'")
        reference = completion.removesuffix(P3_END).strip()
        if not reference:
            continue  # an unlabelled prompt: left out (Task.dropped)
        examples.append(
            Example(
                task=entry.name,
                index=number - 1,
                input=prompt,
                prompt=prompt,
                targets=[reference],
            )
        )
    if not examples:
        raise no_references(path, lines, "completion")
    template = template_of([e.prompt for e in examples])
    head, tail = shared_ends([e.prompt for e in examples])
    if template:  # an example's input is what its prompt adds to the template
        examples = [
            replace(e, input=e.prompt[len(head) : len(e.prompt) - len(tail)].strip() or e.prompt)
            for e in examples
        ]
    return Task(
        name=entry.name,
        examples=with_label_options(examples),
        source="p3",
        family=entry.family,
        split=entry.split,
        instruction=template,
        instructions=(template,) if template else (),
        path=str(path),
        dropped=lines - len(examples),
    )


def shared_ends(prompts: list[str]) -> tuple[str, str]:
    """The text every prompt starts with and the text every one ends with, each cut back to a
    word boundary and never overlapping within a prompt: a rendered template's fixed parts."""
    if len(prompts) < 2:
        return "", ""
    head = os.path.commonprefix(prompts)  # noqa: RUF071 - characters, not paths
    tail = os.path.commonprefix([p[::-1] for p in prompts])[::-1]  # noqa: RUF071
    shortest = min(len(p) for p in prompts)
    if len(head) + len(tail) > shortest:  # the shared start and end overlap in some prompt
        tail = tail[len(head) + len(tail) - shortest :]
    if head and not all(p == head or p[len(head)].isspace() or head[-1].isspace() for p in prompts):
        head = head[: max((i + 1 for i, c in enumerate(head) if c.isspace()), default=0)]
    if tail and not all(
        p == tail or p[-len(tail) - 1].isspace() or tail[0].isspace() for p in prompts
    ):
        tail = tail[min((i for i, c in enumerate(tail) if c.isspace()), default=len(tail)) :]
    return head, tail


def template_of(prompts: list[str]) -> str:
    """The words all prompts share at their start and end, joined by ``" ... "``: a rendered
    template's fixed words. Empty when they share too little."""
    head, tail = shared_ends(prompts)
    parts = [p.strip() for p in (head, tail) if len(p.strip()) >= 3]
    text = " ... ".join(parts)
    return text if len(text) >= _MIN_TEMPLATE_CHARS else ""


def read_jsonl_task(entry: TaskFile) -> Task:
    """A user's own task: one JSON object a line with ``instruction`` and/or ``input``,
    ``references`` (a string or a list), and for multiple choice ``options`` with ``correct``
    (the correct options, or their 0-based indices). The prompt is the instruction, a blank line
    and the input."""
    (path,) = entry.paths
    examples = []
    instructions: Counter[str] = Counter()
    for number, line in read_jsonl(path):
        where = f"{path}, line {number}"
        instruction = _text(line, "instruction", where)
        text = _text(line, "input", where)
        if not instruction.strip() and not text.strip():
            raise DataError(f"{where}: needs a non-empty 'instruction' or 'input'")
        references = strings(line.get("references", []), where, "references")
        options = strings(line["options"], where, "options") if "options" in line else []
        correct = _correct(line.get("correct"), options, where) if options else []
        if options and not correct:
            correct = [r for r in references if r in options]
            if not correct:
                raise DataError(
                    f"{where}: field 'options' needs 'correct' (or a reference among the options)"
                )
        references = list(dict.fromkeys([*references, *correct]))
        if not [r for r in references if r.strip()]:
            raise DataError(f"{where}: field 'references' holds no reference")
        instructions[instruction.strip()] += 1
        prompt = "\n\n".join(part for part in (instruction.strip(), text.strip()) if part)
        examples.append(
            Example(
                task=entry.name,
                index=number - 1,
                input=text,
                prompt=prompt,
                targets=references,
                target_scores=choice_scores(options, correct) if options else None,
                metadata={k: v for k, v in line.items() if k not in _JSONL_FIELDS},
            )
        )
    if not examples:
        raise DataError(f"{path}: holds no examples")
    common = instructions.most_common(1)[0][0] if instructions else ""
    return Task(
        name=entry.name,
        examples=examples,
        source="jsonl",
        family=entry.family,
        split=entry.split,
        instruction=common,
        instructions=tuple(i for i, _ in instructions.most_common() if i),
        path=str(path),
    )


_JSONL_FIELDS = frozenset({"instruction", "input", "references", "options", "correct"})


def _text(line: dict[str, Any], key: str, where: str) -> str:
    value = line.get(key, "")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string; got {type(value).__name__}")
    return value


def _correct(value: Any, options: list[str], where: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            raise DataError(
                f"{where}: field 'correct' holds options or 0-based indices, not {item}"
            )
        if isinstance(item, int):
            if not 0 <= item < len(options):
                raise DataError(
                    f"{where}: field 'correct' index {item} is outside the {len(options)} options"
                )
            out.append(options[item])
        elif isinstance(item, str) and item in options:
            out.append(item)
        else:
            raise DataError(f"{where}: field 'correct' names {item!r}, which is not an option")
    return out
