"""The selection policy: candidates and their signals become a choice.

:func:`choose` fuses each signal of a candidate set (the scorer, agreement among the
candidates, the generator's log-probabilities, a length prior) with a
:class:`~capplug.selection.combiner.Combiner` and returns a :class:`Selection`: the chosen
index into the caller's list, every candidate's fused score and raw signals, and the weights
used. :meth:`Selection.metadata` is the one ``capplug`` metadata schema every surface reports.
The path around it (task-scorer lookup, scoring the distinct texts, recording) is
:class:`capplug.selection.Selector`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capplug.chat import dedupe_key, distinct, flatten_chat
from capplug.selection.agreement import echo, rouge_agreement, word_counts
from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner

__all__ = [
    "DEFAULT_COMBINER",
    "METADATA_KEYS",
    "SCORER_ONLY",
    "TOOL_CALLS_UNSCORED",
    "Scored",
    "Selection",
    "check_logprobs",
    "choose",
    "combiner_of",
    "dedupe_key",
    "distinct",
    "load_combiner",
    "openai_logprobs",
    "reply_logprobs",
    "score_distinct",
    "signal_values",
    "tool_call_order",
    "unscored_metadata",
]

DEFAULT_COMBINER = Combiner(
    {"agreement+length+scorer": {"scorer": 1.0, "agreement": 1.0, "length": 0.0}},
    {"note": "fallback when a checkpoint records no selection weights"},
)

SCORER_ONLY = Combiner(
    {"scorer": {"scorer": 1.0}},
    {"note": "the scorer alone: ranking documents, where agreement among them is no signal"},
)
"""Weights for the scorer alone: the order is the scorer's (the document rerankers' default)."""


@dataclass(frozen=True)
class Scored:
    """One candidate: its index in the caller's list, fused score, and raw signals."""

    index: int
    response: str
    score: float
    """The fused selector's probability that this candidate is the best of the set (NaN when
    the choice was made without scores)."""
    signals: Mapping[str, float]
    """Raw value of every signal used: ``scorer`` in [0, 1], ``agreement`` in [0, 1],
    ``logprob`` (summed), ``logprob_mean``, ``length`` (words)."""


@dataclass(frozen=True)
class Selection:
    """The chosen candidate, with every candidate's scores and the weights that chose it.

    The one result of choosing on every surface; a choice made without scores (tool calls
    passed through, a scorer that failed) is one too (:meth:`unscored`), with ``weights``
    ``None`` and a ``reason``.
    """

    index: int
    """Position of the chosen candidate in the list passed in (the first of equal repeats)."""
    response: str
    score: float
    signals: Mapping[str, float]
    candidates: tuple[Scored, ...]
    """Every candidate, in the order passed in."""
    weights: Mapping[str, float] | None
    """The combiner weights applied to the within-set z-scores of each signal; ``None`` when
    nothing was scored."""
    id: str | None = None
    """The selection's id in a feedback store, when it was recorded there (judge it with
    :meth:`capplug.feedback.FeedbackStore.add`)."""
    task_scorer: Mapping[str, Any] | None = None
    """With task scorers: which one scored (``used``), how similar its task is, the guard's
    verdict, or why the default scored (:meth:`capplug.adapters.TaskScorers.find`)."""
    reason: str | None = None
    """Why the choice was made without scores, or a note the surface adds; else ``None``."""
    given_order: tuple[int, ...] | None = None
    """An unscored choice's order to hand candidates back in (:meth:`unscored`)."""

    @classmethod
    def unscored(cls, texts: Sequence[str], order: Sequence[int], reason: str) -> Selection:
        """A choice made without scores: ``order[0]`` chosen, the candidates handed back in
        ``order``, and ``reason`` saying why."""
        items = tuple(Scored(i, t, math.nan, {}) for i, t in enumerate(texts))
        first = order[0]
        return cls(
            first, texts[first], math.nan, {}, items, None, reason=reason, given_order=tuple(order)
        )

    @property
    def scored(self) -> bool:
        """Whether the choice was made by scores (else :attr:`reason` says why not)."""
        return self.weights is not None

    def ranking(self) -> list[Scored]:
        """Candidates best first (ties keep input order); unscored, in the order given."""
        if not self.scored:
            return [self.candidates[i] for i in self.order()]
        return sorted(self.candidates, key=lambda c: -c.score)

    def order(self) -> list[int]:
        """Indices to hand candidates back in: the chosen one, then the other distinct answers
        best first, then repeats (ties keep input order)."""
        if self.given_order is not None:
            return list(self.given_order)
        seen: set[str] = set()
        repeats = []
        for c in self.candidates:
            key = dedupe_key(c.response)
            repeats.append(key in seen)
            seen.add(key)
        rest = sorted(
            (c.index for c in self.candidates if c.index != self.index),
            key=lambda i: (repeats[i], -self.candidates[i].score),
        )
        return [self.index, *rest]

    def metadata(self) -> dict[str, Any]:
        """The ``capplug`` metadata every surface reports (JSON-ready).

        ``chosen`` indexes ``candidates``; ``scores`` are the fused scores in that order;
        ``signals`` maps each signal to its raw value per candidate; ``weights`` are the fused
        weights over within-set z-scores. Unscored: ``scores``, ``signals`` and ``weights`` are
        ``None`` and ``reason`` says why.
        """
        scored = self.weights is not None
        return {
            "chosen": self.index,
            "candidates": [c.response for c in self.candidates],
            "scores": [round(c.score, 6) for c in self.candidates] if scored else None,
            "signals": {
                name: [_json_number(c.signals[name]) for c in self.candidates]
                for name in self.signals
            }
            if scored
            else None,
            "weights": {k: round(v, 6) for k, v in self.weights.items()} if scored else None,
            "reason": self.reason,
            "selection_id": self.id,
            "task_scorer": None if self.task_scorer is None else dict(self.task_scorer),
        }


TOOL_CALLS_UNSCORED = "a candidate calls tools; tool calls are passed through unscored"

METADATA_KEYS = (
    # collecting (capplug.llms.collect.Collected.metadata)
    "n_requested",
    "n_received",
    "failures",
    "errors",
    "upstream_calls",
    "native_n",
    # choosing (Selection.metadata, or unscored_metadata)
    "chosen",
    "candidates",
    "scores",
    "signals",
    "weights",
    "reason",
    "selection_id",
    "task_scorer",
)
"""The keys of the ``capplug`` metadata every best-of-n surface reports (docs/usage.md, "The capplug metadata")."""


def tool_call_order(calls_tools: Sequence[bool]) -> list[int] | None:
    """Where tool calls are not scored: ``None`` when no candidate calls tools, else the order to
    hand candidates back in, those calling tools first (the first of them is the choice)."""
    with_tools = [i for i, flag in enumerate(calls_tools) if flag]
    if not with_tools:
        return None
    return with_tools + [i for i, flag in enumerate(calls_tools) if not flag]


def unscored_metadata(texts: Sequence[str], order: Sequence[int], reason: str) -> dict[str, Any]:
    """The ``capplug`` metadata of a choice made without scores (tool calls passed through,
    or scoring failed): :meth:`Selection.unscored`'s metadata."""
    return Selection.unscored(texts, order, reason).metadata()


def _json_number(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def check_logprobs(values: Any, n: int, *, argument: str = "logprobs") -> np.ndarray | None:
    """``values`` as a float array of length ``n`` (or ``None``), else a ValueError naming it."""
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(
            f"{argument} must be a list of numbers, one per candidate, or None; "
            f"got {type(values).__name__}"
        )
    if len(values) != n:
        raise ValueError(
            f"{argument} must have one value per candidate: {n} candidates, {len(values)} values"
        )
    missing = [i for i, v in enumerate(values) if v is None]
    if missing and len(missing) < n:
        raise ValueError(
            f"{argument} mixes numbers and None (None at {missing[:5]}); give a value for every "
            f"candidate, or pass {argument}=None"
        )
    if missing:
        return None
    out = np.empty(n)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
            raise TypeError(f"{argument}[{i}] must be a number; got {type(v).__name__}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{argument}[{i}] must be finite; got {v}")
        out[i] = float(v)
    return out


def signal_values(
    texts: Sequence[str],
    *,
    scores: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
    token_counts: np.ndarray | None = None,
    instruction: Any = None,
    use: Sequence[str] = SIGNALS,
) -> dict[str, np.ndarray]:
    """Per-candidate signal arrays, transformed for fusing (the scorer's score as a logit).

    A signal is present when its inputs are (``scores``, ``logprobs``, ``token_counts``) and it
    is in ``use``. Fitting and selection both go through here, so they see the same values.
    """
    out: dict[str, np.ndarray] = {}
    if "scorer" in use and scores is not None:
        p = np.clip(np.asarray(scores, dtype=float), 1e-4, 1 - 1e-4)
        out["scorer"] = np.log(p) - np.log1p(-p)
    if "agreement" in use:
        out["agreement"] = rouge_agreement(texts)
    if "logprob" in use and logprobs is not None:
        out["logprob"] = np.asarray(logprobs, dtype=float)
    if "logprob_mean" in use and logprobs is not None and token_counts is not None:
        out["logprob_mean"] = np.asarray(logprobs, dtype=float) / np.maximum(token_counts, 1)
    if "length" in use:
        out["length"] = np.log1p(word_counts(texts))
    if "echo" in use and instruction is not None:
        out["echo"] = echo(flatten_chat(instruction), texts)
    return out


def openai_logprobs(logprobs: Any) -> tuple[float, int] | None:
    """``(sum, token count)`` of an OpenAI ``choice.logprobs`` object, or ``None`` without one.

    Reads ``content`` (a list of ``{"token", "logprob"}``), also when given as attribute objects
    (the ``openai`` SDK's) or nested under ``logprobs`` (LangChain's ``response_metadata``).
    Non-finite values make the whole candidate's log-probability unknown.
    """
    if logprobs is None:
        return None
    content = (
        logprobs.get("content")
        if isinstance(logprobs, Mapping)
        else getattr(logprobs, "content", None)
    )
    if not isinstance(content, list) or not content:
        return None
    total = 0.0
    for token in content:
        value = (
            token.get("logprob") if isinstance(token, Mapping) else getattr(token, "logprob", None)
        )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return None
        total += float(value)
    return total, len(content)


def reply_logprobs(replies: Sequence[Any]) -> tuple[list[float] | None, list[int] | None]:
    """The log-probability rule for candidates read from model replies, written once: each
    reply's OpenAI ``logprobs`` object (:func:`openai_logprobs`) gives its summed
    log-probability and token count, and they are used only when every candidate has them;
    else ``(None, None)``. (Log-probabilities a caller passes itself are checked strictly
    instead: :func:`check_logprobs`.)"""
    found = [openai_logprobs(r) for r in replies]
    if not found or any(f is None for f in found):
        return None, None
    return [f[0] for f in found], [f[1] for f in found]  # type: ignore[index]


def score_distinct(
    score: Callable[[Any, list[str]], Sequence[float]], instruction: Any, texts: Sequence[str]
) -> np.ndarray:
    """``score(instruction, texts)`` calling ``score`` once on the distinct texts only."""
    unique, where = distinct(texts)
    values = list(score(instruction, unique))
    return np.array([values[j] for j in where], dtype=float)


def choose(
    texts: Sequence[str],
    *,
    scores: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
    token_counts: np.ndarray | None = None,
    instruction: Any = None,
    combiner: Combiner,
    signals: Sequence[str] = SIGNALS,
    judged: bool = False,
) -> Selection:
    """Fuse the given signals of ``texts`` and choose; inputs already validated. ``judged``:
    the log-probabilities are a local LM's log-likelihoods of given texts (the combiner's
    :attr:`~capplug.selection.Combiner.judged` weights apply), not the generator's own.

    The selection policy, written once; :class:`capplug.selection.Selector` (the path every
    surface takes) gathers the inputs and calls it. Non-finite ``scores`` are refused
    (ValueError), never dropped.
    """
    if scores is not None and not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite numbers, one per candidate")
    if len(texts) == 1:  # nothing to choose between: only a score already given is kept
        kept = {} if scores is None else {"scorer": float(scores[0])}
        only = Scored(0, texts[0], 1.0, kept)
        return Selection(0, texts[0], 1.0, kept, (only,), {})
    values = signal_values(
        texts,
        scores=scores,
        logprobs=logprobs,
        token_counts=token_counts,
        instruction=instruction,
        use=signals,
    )
    fused, weights = combiner.fuse(values, judged=judged and logprobs is not None)
    probability = np.exp(fused - fused.max())
    probability /= probability.sum()
    raw = {
        "scorer": scores,
        "agreement": values.get("agreement"),
        "logprob": logprobs,
        "logprob_mean": values.get("logprob_mean"),
        "length": word_counts(texts),
        "echo": values.get("echo"),
    }
    used = [n for n in SIGNALS if n in values]
    items = tuple(
        Scored(i, texts[i], float(probability[i]), {n: float(raw[n][i]) for n in used})
        for i in range(len(texts))
    )
    chosen = items[int(np.argmax(fused))]  # first of equal scores: the earliest repeat
    return Selection(chosen.index, chosen.response, chosen.score, chosen.signals, items, weights)


def combiner_of(scorer: Any) -> Combiner:
    """The selection weights a loaded scorer's checkpoint records, or the fallback weights."""
    config = getattr(getattr(scorer, "model", None), "config", None)
    recorded = getattr(config, CONFIG_KEY, None)
    return DEFAULT_COMBINER if recorded is None else Combiner.from_config(recorded)


def load_combiner(ref: str | os.PathLike[str]) -> Combiner:
    """The selection weights recorded in a scorer checkpoint's ``config.json`` (or the fallback)."""
    import json

    from capplug.models import resolve

    try:
        folder = Path(resolve(ref))
    except Exception:  # a reference the scorer loaded but resolve cannot place: no weights
        return DEFAULT_COMBINER
    config_path = folder / "config.json"
    if not config_path.is_file():
        return DEFAULT_COMBINER
    recorded = json.loads(config_path.read_text()).get(CONFIG_KEY)
    return DEFAULT_COMBINER if recorded is None else Combiner.from_config(recorded)
