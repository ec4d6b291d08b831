"""The one selection path: task-scorer lookup, scoring the distinct candidates, choosing, and
recording the choice for feedback.

Every surface that chooses among candidates goes through a :class:`Selector`: the
:class:`~capplug.selection.Reranker` (which builds one: :meth:`~capplug.selection.Reranker.selector`),
the reranking proxy, the LangChain components, the LlamaIndex postprocessor and the MCP tools.
So the same candidates with the same signals get the same choice, scores and metadata
everywhere: the instruction is read once (:class:`capplug.chat.Prompt`), candidates equal up to
whitespace are scored once (:func:`capplug.chat.distinct`), non-finite scores are refused, and
the choice is recorded from the typed :class:`~capplug.selection.Selection`.

The path is written once, as a generator of the steps that wait on something (a task scorer
lookup, the scorer, the feedback store); :meth:`Selector.select` runs them in the caller's
thread and :meth:`Selector.aselect` awaits them (a server hands its own scoring queue in).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from capplug.chat import Instruction, Prompt, check_responses, distinct
from capplug.llms.collect import describe_error
from capplug.selection.combiner import SIGNALS, Combiner
from capplug.selection.core import DEFAULT_COMBINER, Scored, Selection, check_logprobs, choose

__all__ = ["AsyncScore", "Selector", "as_task_scorers", "lm_logprobs", "record", "signals_for"]

logger = logging.getLogger("capplug.selection")

AsyncScore = Callable[[str, list[str], Any], Awaitable[Sequence[float]]]
"""``score(text, texts, scorer)``: a server's own way to score (its queue), awaited."""


@dataclass(frozen=True)
class Selector:
    """lookup → score → choose → record, for one configuration of the selection.

    Args:
        scorer: anything with ``.score(text, texts)`` (it reads the flattened instruction), or
            ``None`` for no scorer signal.
        combiner: the weights (default: the fallback weights).
        signals: the signals computed (default: those ``combiner`` has weights for).
        lm: a local causal LM whose log-likelihoods stand in for log-probabilities a caller
            does not give (``log_likelihood(instructions, texts)``); the choice then uses the
            combiner's weights for judged candidates (:attr:`Combiner.judged`).
        task_scorers: ``.find(task)`` gives the task scorer to score with, where one is allowed
            (:class:`capplug.adapters.TaskScorers`); the metadata says which scored and why.
        feedback: a :class:`capplug.feedback.FeedbackStore` that records each scored choice
            (its id becomes :attr:`Selection.id`; a store that fails is logged, and the choice
            goes out without an id).
        surface: what the feedback store records as the surface that chose.
        score_single: score a lone candidate too (observers and document rankers report every
            candidate's score); otherwise one candidate is chosen without scoring.
    """

    scorer: Any = None
    combiner: Combiner = DEFAULT_COMBINER
    signals: tuple[str, ...] | None = None
    lm: Any = None
    task_scorers: Any = None
    feedback: Any = None
    surface: str = "python"
    score_single: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", signals_for(self.combiner, self.signals))

    def select(
        self,
        instruction: Instruction | Prompt,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
        model: str | None = None,
    ) -> Selection:
        """Choose the best of ``candidates`` for ``instruction``, in the caller's thread.

        Args:
            instruction: the prompt (a string, a chat, or a :class:`~capplug.chat.Prompt`).
            candidates: the responses; repeats (up to whitespace) are scored once, empty
                strings are allowed.
            logprobs: each candidate's summed token log-probability, or ``None``
                (:func:`~capplug.selection.reply_logprobs` reads them from model replies).
            token_counts: each candidate's number of tokens (adds the per-token mean).
            model: the model that wrote the candidates, for the feedback store.

        Raises:
            ValueError / TypeError: naming the argument, for no candidates, non-strings,
                ``logprobs`` of the wrong length, NaN or infinite values, numbers mixed with
                ``None``, or a scorer that gives the wrong number of scores or non-finite ones.
        """
        steps = self._steps(instruction, candidates, logprobs, token_counts, model)
        return _run(steps)

    async def aselect(
        self,
        instruction: Instruction | Prompt,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
        model: str | None = None,
        score: AsyncScore | None = None,
    ) -> Selection:
        """:meth:`select`, awaited: the lookup, the LM and the feedback store run in worker
        threads, and the scorer through ``score`` when given (a server's queue, called with the
        text, the distinct candidates and the scorer to use), else in a worker thread.
        Cancelling it cancels the ``score`` it awaits (a worker thread finishes on its own)."""
        steps = self._steps(instruction, candidates, logprobs, token_counts, model)
        return await _arun(steps, score)

    def rank(
        self,
        instruction: Instruction | Prompt,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
        top_k: int | None = None,
    ) -> list[Scored]:
        """Candidates best first, each with its index into ``candidates`` (the first
        ``top_k``)."""
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be a positive integer or None; got {top_k!r}")
        chosen = self.select(instruction, candidates, logprobs=logprobs, token_counts=token_counts)
        return chosen.ranking()[:top_k]

    def _steps(
        self,
        instruction: Instruction | Prompt,
        candidates: Sequence[str],
        logprobs: Sequence[float | None] | None,
        token_counts: Sequence[int] | None,
        model: str | None,
    ) -> Generator[_Step, Any, Selection]:
        """The path itself: each ``yield`` is a step that waits (run by :func:`_run` or
        :func:`_arun`), and what it gives back is sent in."""
        prompt = Prompt.of(instruction)
        texts = check_responses(candidates, argument="candidates")
        lp = check_logprobs(logprobs, len(texts))
        counts = check_logprobs(token_counts, len(texts), argument="token_counts")
        if counts is not None and lp is None:
            raise ValueError("token_counts needs logprobs: the mean is logprob / token_count")
        signals = set(self.signals or ())
        several = len(texts) > 1
        judged = False
        if lp is None and self.lm is not None and several and {"logprob", "logprob_mean"} & signals:
            # The LM reads a chat as a chat (its template); a Prompt is read as its text.
            given = prompt.text if isinstance(instruction, Prompt) else instruction
            lp, counts = yield _Call(lm_logprobs, (self.lm, given, texts))
            judged = True
        scores, task = None, None
        if self.scorer is not None and "scorer" in signals and (several or self.score_single):
            scorer = self.scorer
            if self.task_scorers is not None:
                found = yield _Call(self.task_scorers.find, (prompt.task,))
                scorer, task = found.scorer or scorer, dict(found.info)
            unique, where = distinct(texts)
            values = yield _Score(scorer, prompt.text, unique)
            scores = _spread(values, where, len(unique))
        chosen = choose(
            texts,
            scores=scores,
            logprobs=lp,
            token_counts=counts,
            instruction=prompt.text,
            combiner=self.combiner,
            signals=self.signals or (),
            judged=judged,
        )
        chosen = replace(chosen, task_scorer=task)
        if self.feedback is not None:
            details = {"surface": self.surface, "model": model}
            chosen = yield _Call(record, (self.feedback, prompt, chosen), details)
        return chosen


def signals_for(combiner: Combiner, signals: Sequence[str] | None = None) -> tuple[str, ...]:
    """The signals to compute, in :data:`SIGNALS` order: ``signals``, or by default those
    ``combiner`` has weights for (a signal no weight set has is not computed).

    Raises:
        ValueError: a name that is not a signal.
    """
    if signals is None:
        tables = (combiner.weights, combiner.judged)
        signals = {name for table in tables for key in table for name in key.split("+")}
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        raise ValueError(f"signals must be names from {SIGNALS}; got {unknown}")
    return tuple(s for s in SIGNALS if s in signals)


def record(
    feedback: Any,
    instruction: Instruction | Prompt,
    chosen: Selection,
    *,
    surface: str = "python",
    model: str | None = None,
) -> Selection:
    """``chosen`` stored in the feedback store ``feedback``, with its id set; when storing
    fails, the error is logged and ``chosen`` comes back without an id (the choice goes out
    either way)."""
    prompt = Prompt.of(instruction)
    try:
        selection_id = feedback.record(
            prompt.text,
            [c.response for c in chosen.candidates],
            chosen.index,
            scores=[c.score for c in chosen.candidates],
            surface=surface,
            model=model or None,
            task=prompt.task,
        )
    except Exception as error:
        logger.error("could not record the selection for feedback: %s", describe_error(error))
        return chosen
    return replace(chosen, id=selection_id)


def lm_logprobs(lm: Any, instruction: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's summed log-likelihood and token count under the local LM ``lm``,
    computed once per distinct text."""
    unique, where = distinct(texts)
    values = lm.log_likelihood([instruction] * len(unique), unique)
    # An empty reply has no tokens: its sum is 0, which ranks it above every real answer.
    lowest = min(v[0] for v in values)
    sums = np.array([values[j][0] if values[j][2] else lowest for j in where], dtype=float)
    counts = np.array([max(values[j][2], 1) for j in where], dtype=float)
    return sums, counts


def as_task_scorers(value: Any, scorer: Any) -> Any:
    """The task scorers a caller means: ``None``/``False`` for none, ``True`` for the default
    folder, a folder, or a :class:`capplug.adapters.TaskScorers` (used as it is)."""
    if value is None or value is False:
        return None
    if value is True or isinstance(value, str | os.PathLike):
        if scorer is None:
            raise ValueError("task_scorers adapt the scorer; they need a scorer")
        from capplug.adapters.task_scorers import TaskScorers

        return TaskScorers(None if value is True else value, scorer=scorer)
    if callable(getattr(value, "find", None)):
        return value
    raise TypeError(
        "task_scorers must be True, a folder, or a capplug.adapters.TaskScorers; "
        f"got {type(value).__name__}"
    )


# ------------------------------------------------------------------ running the path's steps


@dataclass(frozen=True)
class _Call:
    """A blocking call: run where it stands, or in a worker thread."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Score:
    """The scorer's scores of the distinct candidate ``texts`` for ``text``."""

    scorer: Any
    text: str
    texts: list[str]


_Step = _Call | _Score


def _spread(values: Any, where: list[int], count: int) -> np.ndarray:
    """The scores of the distinct texts, one per candidate; refused unless one per text."""
    values = list(values)
    if len(values) != count:
        raise ValueError(f"the scorer returned {len(values)} scores for {count} candidates")
    return np.array([values[j] for j in where], dtype=float)


def _run(steps: Generator[_Step, Any, Selection]) -> Selection:
    answer: Any = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value
        if isinstance(step, _Call):
            answer = step.fn(*step.args, **step.kwargs)
        else:
            answer = step.scorer.score(step.text, step.texts)


async def _arun(steps: Generator[_Step, Any, Selection], score: AsyncScore | None) -> Selection:
    answer: Any = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value
        if isinstance(step, _Call):
            answer = await asyncio.to_thread(step.fn, *step.args, **step.kwargs)
        elif score is not None:
            answer = await score(step.text, step.texts, step.scorer)
        else:
            answer = await asyncio.to_thread(step.scorer.score, step.text, step.texts)
