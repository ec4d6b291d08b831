"""The one task model every data source is read into: a task, its instruction and its examples.

A :class:`Task` has a name unique in its pool (``bigbench/qa_wikidata``, ``p3/ag_news_classify``),
the source format it came from, a family (the dataset it belongs to, so that validation folds
never split one dataset), its split from the pool's manifest, an instruction where the format has
one, and :class:`Example` objects whose ``prompt`` is built the way the source builds it.
Multiple-choice examples carry their options with the correct ones marked (``target_scores``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Split = Literal["train", "dev"]
SPLITS: tuple[Split, ...] = ("train", "dev")

# BIG-bench metrics that score generated text (the task is generative when it has one).
GENERATIVE_METRICS = frozenset(
    {
        "bleu",
        "bleurt",
        "exact_str_match",
        "case_insensitive_str_match",
        "sequence_f1",
        "numeric_match_with_0_1_relative_error",
        "rouge",
    }
)


@dataclass(frozen=True, slots=True)
class Example:
    """One example: its raw input, the prompt a model sees, references and any options."""

    task: str
    """The name of the task it belongs to."""
    index: int
    """Position in the source file: a stable id for the example within its task."""
    input: str
    """The raw input, before the source's instruction, prefixes or choices."""
    prompt: str
    """What a model is shown zero-shot, built the way the source builds it."""
    targets: list[str]
    """References: correct responses (for multiple choice, the top-scored options)."""
    target_scores: dict[str, float] | None = None
    """Answer options (in source order) and their scores, the best ones correct; ``None`` for
    examples that are not multiple choice."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Any other fields the source gives (``id``, ``comment``, which part of a file...)."""

    @property
    def options(self) -> list[str]:
        """The answer options in source order (empty when the example is not multiple choice)."""
        return list(self.target_scores or ())

    @property
    def correct(self) -> list[bool]:
        """For each option, whether it is a correct one (it has the best score)."""
        if not self.target_scores:
            return []
        best = max(self.target_scores.values())
        return [score == best for score in self.target_scores.values()]

    @property
    def is_test(self) -> bool:
        """Whether the ``example_split`` rule puts this example in its task's test part."""
        return is_test_example(self.task, self.input)


@dataclass(frozen=True, slots=True)
class Task:
    """A task (or a subtask, or one prompt template of a dataset) and its examples."""

    name: str
    """Unique in its pool: the file's path below the data folder, without its format's suffix."""
    examples: list[Example]
    source: str = "bigbench"
    """The format it was read from: ``bigbench``, ``bbh``, ``natural_instructions_v1``,
    ``super_natural_instructions``, ``p3``, ``instruction_induction`` or ``jsonl``."""
    family: str = ""
    """The dataset the task belongs to; folds that group by family never split a dataset."""
    split: Split = "train"
    """``train`` (train and tune on it) or ``dev`` (report on it), from the pool's manifest."""
    instruction: str = ""
    """What the task asks for in words (a definition, task prefix, template or human-written
    instruction); empty where the source has none."""
    instructions: tuple[str, ...] = ()
    """Every phrasing of the instruction the source gives (the first is ``instruction``)."""
    description: str = ""
    """The source's description of the task, where it has one."""
    metrics: list[str] = field(default_factory=list)
    """The source's metrics (BIG-bench's), where it names them."""
    path: str = ""
    """The file the task was read from."""
    dropped: int = 0
    """Examples of the file left out: exact duplicates (the first copy is kept) and examples
    with no reference."""

    @property
    def definition(self) -> str | None:
        """The instruction, or ``None`` when the task has none."""
        return self.instruction or None

    @property
    def is_multiple_choice(self) -> bool:
        """Every example carries answer options."""
        return bool(self.examples) and all(e.target_scores is not None for e in self.examples)

    @property
    def is_generative(self) -> bool:
        """The task is scored on generated text: a generative metric, or no options to choose."""
        if self.metrics:
            return bool(GENERATIVE_METRICS.intersection(self.metrics))
        return not self.is_multiple_choice

    def split_examples(self, part: Literal["train", "test"]) -> list[Example]:
        """The examples on one side of the ``example_split`` rule, in file order."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test'; got {part!r}")
        want_test = part == "test"
        return [e for e in self.examples if e.is_test == want_test]


def is_test_example(task: str, example_input: str) -> bool:
    """The ``example_split`` rule: sha1 of ``name + '\\n' + input``, as an integer, mod 10 < 3,
    where ``name`` is the task's name as the original BIG-bench lists give it (see
    :func:`split_name`), so a task keeps the test examples it had there."""
    digest = hashlib.sha1((split_name(task) + "\n" + example_input).encode()).hexdigest()
    return int(digest, 16) % 10 < 3


def split_name(task: str) -> str:
    """The name the ``example_split`` rule hashes: a BIG-bench task without its source
    (``bigbench/qa_wikidata`` is ``qa_wikidata``), a Natural Instructions v1 subtask as BIG-bench
    named its copy (``natural_instructions/subtask043_...``); any other task by its own name."""
    source, sep, rest = task.partition("/")
    if sep and source == "bigbench":
        return rest
    if sep and source == "natural_instructions_v1":
        return f"natural_instructions/{rest}"
    return task


def choice_scores(options: list[str], correct: list[str]) -> dict[str, float]:
    """``target_scores`` for options of which ``correct`` are right (1.0) and the rest wrong."""
    wanted = set(correct)
    return {option: (1.0 if option in wanted else 0.0) for option in dict.fromkeys(options)}
