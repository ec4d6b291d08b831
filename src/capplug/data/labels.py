"""Cappy's weak labels: references, negatives, normalised options and Rouge-L-scored candidates."""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from capplug.data.tasks import Example, Task

Source = Literal["gold", "negative", "option", "sampled", "clipped"]
Candidate = str | tuple[str, str | Mapping[str, Any]]

# The end of a sentence: ., ! or ? (after any closing quote or bracket), then white space.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")

# Random draws before falling back to a scan when looking for another example's reference.
_NEGATIVE_DRAWS = 32


@dataclass(frozen=True, slots=True)
class LabelledRow:
    """One (instruction, response, label) training row with its provenance."""

    task: str
    example_id: int
    instruction: str
    response: str
    label: float
    """How correct the response is, in [0, 1]."""
    source: Source
    generator: str = ""
    """Generator settings for ``sampled`` rows, with ``+first_line`` or ``+first_sentence``
    for ``clipped`` ones; empty for the others."""

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict (one column per field)."""
        return asdict(self)


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Rouge-L F-measure of ``prediction`` (rouge-score, Porter stemmer), max over references."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references must hold at least one string; got 0 items")
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string; got {type(prediction).__name__}")
    scorer = _scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def normalised_option_scores(target_scores: Mapping[str, float]) -> dict[str, float]:
    """Min-max normalise one example's option scores to [0, 1].

    When every option has the same score there is no spread to normalise: a positive score
    maps to 1.0 and a zero or negative one to 0.0.
    """
    if not target_scores:
        raise ValueError("target_scores must hold at least one option; got 0")
    low, high = min(target_scores.values()), max(target_scores.values())
    if high == low:
        return {k: (1.0 if v > 0 else 0.0) for k, v in target_scores.items()}
    return {k: (v - low) / (high - low) for k, v in target_scores.items()}


def reference_rows(
    examples: Task | Sequence[Example], *, seed: int = 0, negatives: bool = True
) -> Iterator[LabelledRow]:
    """Label one task's references, negatives and options, Cappy's way.

    For every example: each reference gets 1.0 (``gold``); for each reference, one reference
    of another example of the same task gets 0.0 (``negative``), drawn deterministically from
    ``seed``; each multiple-choice option gets its score min-max normalised over the example's
    options (``option``). An option identical to a reference is left to the ``gold`` row.
    A negative never repeats one of the example's own references or positively scored
    options, nor comes from an example with the same input.
    """
    items = list(examples.examples if isinstance(examples, Task) else examples)
    if not items:
        return
    task = items[0].task
    if any(e.task != task for e in items):
        names = sorted({e.task for e in items})
        raise ValueError(f"examples must come from one task; got {len(names)}: {names[:5]}")
    pool = [(i, ref) for i, example in enumerate(items) for ref in example.targets]
    for position, example in enumerate(items):
        options = (
            normalised_option_scores(example.target_scores)
            if example.target_scores is not None
            else {}
        )
        references = list(dict.fromkeys(example.targets))
        for ref in references:
            yield LabelledRow(task, example.index, example.prompt, ref, 1.0, "gold")
        if negatives:
            forbidden = {_norm(r) for r in references}
            forbidden |= {_norm(o) for o, label in options.items() if label > 0}
            rng = random.Random(f"{seed}\x00{task}\x00{example.index}")
            for _ in references:
                negative = _draw_negative(rng, pool, items, position, forbidden)
                if negative is None:
                    break
                forbidden.add(_norm(negative))  # distinct negatives for one example
                yield LabelledRow(task, example.index, example.prompt, negative, 0.0, "negative")
        own = set(references)
        for option, label in options.items():
            if option not in own:
                yield LabelledRow(task, example.index, example.prompt, option, label, "option")


def label_candidates(
    example: Example,
    candidates: Iterable[Candidate],
    *,
    generator: str | Mapping[str, Any] = "",
) -> list[LabelledRow]:
    """Label generated candidates by Rouge-L against the example's references (``sampled``).

    Candidates are de-duplicated on their whitespace-stripped text; the first copy (and its
    generator settings) is kept. A candidate is a string, labelled with ``generator``, or a
    ``(text, settings)`` pair carrying its own settings. Settings given as a mapping are stored
    as sorted-key JSON.
    """
    if not example.targets:
        raise ValueError(
            f"example {example.index} of task {example.task!r} has no references to label against"
        )
    rows: list[LabelledRow] = []
    seen: set[str] = set()
    for position, candidate in enumerate(candidates):
        if isinstance(candidate, str):
            text, settings = candidate, generator
        elif isinstance(candidate, tuple) and len(candidate) == 2:
            text, settings = candidate
        else:
            raise TypeError(
                f"candidates[{position}] must be a string or a (text, generator) pair; "
                f"got {type(candidate).__name__}"
            )
        if not isinstance(text, str):
            raise TypeError(
                f"candidates[{position}] text must be a string; got {type(text).__name__}"
            )
        key = text.strip()
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            LabelledRow(
                task=example.task,
                example_id=example.index,
                instruction=example.prompt,
                response=text,
                label=rouge_l(text, example.targets),
                source="sampled",
                generator=_settings_text(settings),
            )
        )
    return rows


def clipped_variants(text: str) -> list[tuple[str, str]]:
    """The shorter answers a model stopped early would have given: ``(clip, text)`` pairs.

    ``first_line`` is the first non-empty line and ``first_sentence`` that line up to its first
    sentence end; each is given only when it is shorter than what comes before it (so a
    one-line, one-sentence answer has no variants). Decimals such as ``3.5`` are not sentence
    ends: a sentence ends at ., ! or ? followed by white space.
    """
    whole = text.strip()
    lines = [line.strip() for line in whole.splitlines() if line.strip()]
    if not lines:
        return []
    variants: list[tuple[str, str]] = []
    first_line = lines[0]
    if first_line != whole:
        variants.append(("first_line", first_line))
    end = _SENTENCE_END.search(first_line)
    if end is not None and end.end() < len(first_line):
        variants.append(("first_sentence", first_line[: end.end()].strip()))
    return variants


def label_clipped(rows: Iterable[LabelledRow], references: Sequence[str]) -> list[LabelledRow]:
    """Label the clipped variants of one example's ``sampled`` rows by Rouge-L (``clipped``).

    Generated answers often hold the right short answer and then drift on; the variants put
    that short answer beside the long one, labelled by the same Rouge-L against the example's
    ``references``, so a scorer learns when stopping early is better and when it loses content.
    A variant that repeats one of the rows' texts (or an earlier variant) is dropped.
    """
    rows = list(rows)
    seen = {row.response.strip() for row in rows}
    clipped: list[LabelledRow] = []
    for row in rows:
        if row.source != "sampled":
            continue
        for clip, text in clipped_variants(row.response):
            if text in seen:
                continue
            seen.add(text)
            label = rouge_l(text, references)
            clipped.append(
                replace(
                    row,
                    response=text,
                    label=label,
                    source="clipped",
                    generator=f"{row.generator}+{clip}",
                )
            )
    return clipped


def _draw_negative(
    rng: random.Random,
    pool: Sequence[tuple[int, str]],
    items: Sequence[Example],
    position: int,
    forbidden: set[str],
) -> str | None:
    own_input = items[position].input

    def usable(entry: tuple[int, str]) -> bool:
        owner, text = entry
        return (
            owner != position and items[owner].input != own_input and _norm(text) not in forbidden
        )

    if not pool:
        return None
    for _ in range(_NEGATIVE_DRAWS):
        entry = pool[rng.randrange(len(pool))]
        if usable(entry):
            return entry[1]
    # Few usable references left: scan once from a random start so the pick stays seeded.
    start = rng.randrange(len(pool))
    for offset in range(len(pool)):
        entry = pool[(start + offset) % len(pool)]
        if usable(entry):
            return entry[1]
    return None


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _settings_text(settings: str | Mapping[str, Any]) -> str:
    if isinstance(settings, str):
        return settings
    return json.dumps(dict(settings), sort_keys=True, default=str)
