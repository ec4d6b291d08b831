"""Tasks that come with a written instruction: Natural Instructions v1, Super-NaturalInstructions
and instruction induction."""

from __future__ import annotations

from typing import Any

from capplug.data.formats.common import (
    TaskFile,
    field_of,
    no_references,
    read_json,
    strings,
    with_label_options,
)
from capplug.data.tasks import Example, Task, choice_scores
from capplug.errors import DataError


def ni_prompt(definition: str, text: str) -> str:
    """Natural Instructions' zero-shot encoding: the definition, then the input to complete."""
    definition = definition.strip()
    if definition and definition[-1] not in ".!?":
        definition += "."
    head = f"Definition: {definition}\n\n" if definition else ""
    return f"{head}Now complete the following example -\nInput: {text.strip()}\nOutput: "


def read_natural_instructions(entry: TaskFile) -> Task:
    """One NI v1 (``Definition`` a string) or Super-NaturalInstructions (a list) task file."""
    (path,) = entry.paths
    data = read_json(path)
    where = str(path)
    raw_definition = field_of(data, "Definition", (str, list), where)
    definitions = strings(raw_definition, where, "Definition")
    definition = definitions[0].strip() if definitions else ""
    instances = field_of(data, "Instances", list, where)
    examples = []
    for index, raw in enumerate(instances):
        at = f"{where}, Instances[{index}]"
        text = field_of(raw, "input", str, at)
        references = strings(field_of(raw, "output", (str, list), at), at, "output")
        references = [r for r in references if r.strip()]
        if not references:
            continue  # an instance nobody answered: left out (Task.dropped)
        metadata = {"id": raw["id"]} if "id" in raw else {}
        examples.append(
            Example(
                task=entry.name,
                index=index,
                input=text,
                prompt=ni_prompt(definition, text),
                targets=references,
                metadata=metadata,
            )
        )
    if not examples:
        raise no_references(path, len(instances), "output")
    prompt = data.get("Prompt") if isinstance(data.get("Prompt"), str) else ""
    title = data.get("Title") if isinstance(data.get("Title"), str) else ""
    phrasings = [definition, *(d.strip() for d in definitions[1:]), (prompt or "").strip()]
    return Task(
        name=entry.name,
        examples=with_label_options(examples),
        source=entry.source,
        family=entry.family,
        split=entry.split,
        instruction=definition,
        instructions=tuple(dict.fromkeys(p for p in phrasings if p)),
        description=title or "",
        path=where,
        dropped=len(instances) - len(examples),
    )


_II_PARTS = ("induce", "execute")


def read_instruction_induction(entry: TaskFile) -> Task:
    """One instruction-induction task: its human-written instructions (``annotations``) and the
    examples of its ``induce`` and ``execute`` files, in that order. Each example is prompted
    with one of the instructions in turn, so a task shows all of its phrasings."""
    by_part = {p.parent.name: p for p in entry.paths}
    instructions: list[str] = []
    if "annotations" in by_part:
        path = by_part["annotations"]
        annotations = field_of(read_json(path), "annotations", list, str(path))
        instructions = [a.strip() for a in annotations if isinstance(a, str) and a.strip()]
    examples: list[Example] = []
    for part in _II_PARTS:
        if part not in by_part:
            continue
        path = by_part[part]
        raw_examples = field_of(read_json(path), "examples", (dict, list), str(path))
        items = raw_examples.values() if isinstance(raw_examples, dict) else raw_examples
        for position, raw in enumerate(items):
            at = f"{path}, example {position + 1}"
            text, references, options = _ii_example(raw, at, position)
            instruction = instructions[len(examples) % len(instructions)] if instructions else ""
            examples.append(
                Example(
                    task=entry.name,
                    index=len(examples),
                    input=text,
                    prompt=_ii_prompt(instruction, text),
                    targets=references,
                    target_scores=choice_scores(options, references[:1]) if options else None,
                    metadata={"part": part},
                )
            )
    return Task(
        name=entry.name,
        examples=with_label_options(examples),
        source="instruction_induction",
        family=entry.family,
        split=entry.split,
        instruction=instructions[0] if instructions else "",
        instructions=tuple(dict.fromkeys(instructions)),
        path=" ".join(str(p) for p in entry.paths),
    )


def _ii_prompt(instruction: str, text: str) -> str:
    head = f"{instruction}\n\n" if instruction else ""
    return f"{head}Input: {text}\nOutput:"


def _ii_example(raw: Any, where: str, position: int) -> tuple[str, list[str], list[str]]:
    """(input, references, options) of one instruction-induction example, whatever its shape."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object; got {type(raw).__name__}")
    if "cause" in raw and "effect" in raw:  # cause_and_effect: which sentence is the cause?
        cause = field_of(raw, "cause", str, where)
        effect = field_of(raw, "effect", str, where)
        first, second = (cause, effect) if position % 2 else (effect, cause)
        return f"Sentence 1: {first} Sentence 2: {second}", [cause], [first, second]
    if "items" in raw:  # common_concept: what the items have in common
        items = field_of(raw, "items", list, where)
        concepts = strings(raw.get("all_common_concepts") or raw.get("concept"), where, "concept")
        return ", ".join(str(i) for i in items), concepts, []
    text = field_of(raw, "input", str, where)
    output = field_of(raw, "output", str, where)
    references = [output]
    for key in ("possible_translations", "other_rhymes", "possible_outputs"):
        if isinstance(raw.get(key), list):
            # a word rhymes with itself, but repeating the input is not an answer
            references += [str(r) for r in raw[key] if str(r).strip() and str(r) != text]
    return text, list(dict.fromkeys(references)), []
