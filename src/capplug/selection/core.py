"""The one place where candidates become a choice.

:class:`Reranker` gathers each signal for a candidate set (the scorer, agreement among the
candidates, the generator's log-probabilities, a length prior), fuses them with a
:class:`~capplug.selection.combiner.Combiner`, and returns a :class:`Selection`: the chosen
index into the caller's list, every candidate's fused score and raw signals, and the weights
used. Every surface that chooses among candidates (Python calls, the proxy, the LangChain
components) goes through it, and :meth:`Selection.metadata` is the one ``capplug`` metadata
schema they all report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capplug.chat import Instruction, check_responses, dedupe_key, distinct, flatten_chat
from capplug.feedback import as_feedback_store, check_watcher, judge_selection
from capplug.models import DEFAULT_SCORER
from capplug.selection.agreement import echo, rouge_agreement, word_counts
from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner

__all__ = [
    "METADATA_KEYS",
    "TOOL_CALLS_UNSCORED",
    "Reranker",
    "Scored",
    "Selection",
    "as_task_scorers",
    "check_logprobs",
    "choose",
    "combiner_of",
    "dedupe_key",
    "distinct",
    "load_combiner",
    "openai_logprobs",
    "record",
    "score_distinct",
    "signal_values",
    "tool_call_order",
    "unscored_metadata",
]

DEFAULT_COMBINER = Combiner(
    {"agreement+length+scorer": {"scorer": 1.0, "agreement": 1.0, "length": 0.0}},
    {"note": "fallback when a checkpoint records no selection weights"},
)


@dataclass(frozen=True)
class Scored:
    """One candidate: its index in the caller's list, fused score, and raw signals."""

    index: int
    response: str
    score: float
    """The fused selector's probability that this candidate is the best of the set."""
    signals: Mapping[str, float]
    """Raw value of every signal used: ``scorer`` in [0, 1], ``agreement`` in [0, 1],
    ``logprob`` (summed), ``logprob_mean``, ``length`` (words)."""


@dataclass(frozen=True)
class Selection:
    """The chosen candidate, with every candidate's scores and the weights that chose it."""

    index: int
    """Position of the chosen candidate in the list passed in (the first of equal repeats)."""
    response: str
    score: float
    signals: Mapping[str, float]
    candidates: tuple[Scored, ...]
    """Every candidate, in the order passed in."""
    weights: Mapping[str, float]
    """The combiner weights applied to the within-set z-scores of each signal."""
    id: str | None = None
    """The selection's id in a feedback store, when it was recorded there (judge it with
    :meth:`capplug.feedback.FeedbackStore.add`)."""
    task_scorer: Mapping[str, Any] | None = None
    """With task scorers: which one scored (``used``), how similar its task is, the guard's
    verdict, or why the default scored (:meth:`capplug.adapters.TaskScorers.find`)."""

    def ranking(self) -> list[Scored]:
        """Candidates best first (ties keep input order)."""
        return sorted(self.candidates, key=lambda c: -c.score)

    def order(self) -> list[int]:
        """Indices to hand candidates back in: the chosen one, then the other distinct answers
        best first, then repeats (ties keep input order)."""
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
        weights over within-set z-scores.
        """
        return {
            "chosen": self.index,
            "candidates": [c.response for c in self.candidates],
            "scores": [round(c.score, 6) for c in self.candidates],
            "signals": {
                name: [_json_number(c.signals[name]) for c in self.candidates]
                for name in self.signals
            },
            "weights": {k: round(v, 6) for k, v in self.weights.items()},
            "reason": None,
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
    or scoring failed): :meth:`Selection.metadata`'s schema with ``reason`` saying why."""
    return {
        "chosen": order[0],
        "candidates": list(texts),
        "scores": None,
        "signals": None,
        "weights": None,
        "reason": reason,
        "selection_id": None,
        "task_scorer": None,
    }


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
) -> Selection:
    """Fuse the given signals of ``texts`` and choose; inputs already validated.

    The selection policy, written once: every surface that has its candidates' scorer scores
    (and log-probabilities, when it has them) calls this.
    """
    if len(texts) == 1:  # nothing to choose between: no signal is computed
        only = Scored(0, texts[0], 1.0, {})
        return Selection(0, texts[0], 1.0, {}, (only,), {})
    if scores is not None and not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite numbers, one per candidate")
    values = signal_values(
        texts,
        scores=scores,
        logprobs=logprobs,
        token_counts=token_counts,
        instruction=instruction,
        use=signals,
    )
    fused, weights = combiner.fuse(values)
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


class Reranker:
    """Best-of-n selection that fuses the scorer, agreement and log-probabilities.

    ``Reranker()`` loads the bundled scorer and the selection weights stored with it. Every
    signal is optional: pass ``logprobs`` when the generator returns them; without them the
    weights fitted without log-probabilities apply.

    Args:
        scorer: a :class:`capplug.Scorer`, a reference to load one, or ``None`` for no scorer.
        combiner: the weights; default: those recorded in the scorer checkpoint's config.
        signals: restrict the signals used (default: those the combiner has weights for).
        lm: a local causal LM (a :class:`capplug.llms.LocalChatModel` or a reference) that
            computes each candidate's log-likelihood when ``logprobs`` is not given.
        feedback: record every selection in a :class:`capplug.feedback.FeedbackStore`
            (``True``: the default file; or a path, or a store), so that it can be judged
            later: :attr:`Selection.id` is then its id.
        task_scorers: score with the task scorer adapted to the instruction's task, where the
            guard allowed one (:class:`capplug.adapters.TaskScorers`; ``True``: the default
            folder; or a folder); :attr:`Selection.task_scorer` says which scored and why.
        auto_adapt: a :class:`capplug.training.auto_adapt.AutoAdapter` watching ``feedback``:
            judgements stored through :meth:`judge` adapt their task's scorer in the background
            once it is due (by default after 8 judged selections, then after every 8 more);
            with ``task_scorers`` on the same store, the next selections of that task use it
            where its guard allowed it.
    """

    def __init__(
        self,
        scorer: Any = DEFAULT_SCORER,
        *,
        combiner: Combiner | None = None,
        signals: Sequence[str] | None = None,
        lm: Any = None,
        feedback: Any = None,
        task_scorers: Any = None,
        auto_adapt: Any = None,
    ) -> None:
        from capplug.scoring import load_scorer

        if scorer is not None:  # None here means no scorer: the other signals alone
            scorer = load_scorer(scorer)
        if combiner is None:
            combiner = combiner_of(scorer)
        self.scorer = scorer
        self.combiner = combiner or DEFAULT_COMBINER
        if signals is None:  # what the weights can use: a signal no weight set has is not computed
            signals = {name for key in self.combiner.weights for name in key.split("+")}
        unknown = [s for s in signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"signals must be names from {SIGNALS}; got {unknown}")
        self.signals = tuple(s for s in SIGNALS if s in signals)
        if isinstance(lm, str | os.PathLike):
            from capplug.llms import LocalChatModel

            lm = LocalChatModel.from_pretrained(lm)
        self.lm = lm
        self.feedback = as_feedback_store(feedback)
        self.task_scorers = as_task_scorers(task_scorers, scorer)
        self.auto_adapter = check_watcher(auto_adapt, self.feedback, owner="the Reranker")
        """The :class:`~capplug.training.auto_adapt.AutoAdapter` :meth:`judge` notifies."""

    def __repr__(self) -> str:
        return f"Reranker(scorer={self.scorer!r}, signals={self.signals}, lm={self.lm!r})"

    def select(
        self,
        instruction: Instruction,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
    ) -> Selection:
        """Choose the best of ``candidates`` for ``instruction``.

        Args:
            instruction: the prompt (a string or a chat).
            candidates: the responses; repeats are scored once, empty strings are allowed.
            logprobs: each candidate's summed token log-probability under the model that wrote
                it, or ``None``.
            token_counts: each candidate's number of tokens (adds the per-token mean).

        Raises:
            ValueError / TypeError: naming the argument, for no candidates, non-strings,
                ``logprobs`` of the wrong length, NaN or infinite values, or numbers mixed with
                ``None``.
        """
        texts = check_responses(candidates, argument="candidates")
        lp = check_logprobs(logprobs, len(texts))
        counts = check_logprobs(token_counts, len(texts), argument="token_counts")
        if counts is not None and lp is None:
            raise ValueError("token_counts needs logprobs: the mean is logprob / token_count")
        if (
            lp is None
            and self.lm is not None
            and len(texts) > 1
            and ({"logprob", "logprob_mean"} & set(self.signals))
        ):
            lp, counts = self._lm_logprobs(instruction, texts)
        scores = None
        task = None
        if self.scorer is not None and "scorer" in self.signals and len(texts) > 1:
            scorer = self.scorer
            if self.task_scorers is not None:
                found = self.task_scorers.find(instruction)
                scorer, task = found.scorer or scorer, found.info
            scores = score_distinct(scorer.score, instruction, texts)
        chosen = choose(
            texts,
            scores=scores,
            logprobs=lp,
            token_counts=counts,
            instruction=instruction,
            combiner=self.combiner,
            signals=self.signals,
        )
        if task is not None:
            chosen = replace(chosen, task_scorer=task)
        if self.feedback is None:
            return chosen
        return record(self.feedback, instruction, chosen, surface="python")

    def judge(self, selection_id: str, **judgement: Any) -> Any:
        """Store a judgement of one of this reranker's recorded selections (its
        :attr:`Selection.id`), as :meth:`capplug.feedback.FeedbackStore.add` takes it: ``label``
        (with ``candidate``), ``preferred`` or ``reference``; with ``auto_adapt``, its task is
        adapted in the background once it is due. Returns the stored
        :class:`~capplug.feedback.Judgement`.

        Raises:
            ValueError: this reranker records no selections (no ``feedback``).
            capplug.feedback.FeedbackError: as ``FeedbackStore.add`` (nothing is stored).
        """
        return judge_selection(
            self.feedback,
            selection_id,
            owner="this Reranker",
            watcher=self.auto_adapter,
            **judgement,
        )

    def rank(
        self,
        instruction: Instruction,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
        top_k: int | None = None,
    ) -> list[Scored]:
        """Candidates best first, each with its index into ``candidates``."""
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be a positive integer or None; got {top_k!r}")
        selection = self.select(
            instruction, candidates, logprobs=logprobs, token_counts=token_counts
        )
        return selection.ranking()[:top_k]

    def _lm_logprobs(
        self, instruction: Instruction, texts: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        distinct = list(dict.fromkeys(texts))
        values = self.lm.log_likelihood([instruction] * len(distinct), distinct)
        by_text = dict(zip(distinct, values, strict=True))
        # An empty reply has no tokens: its sum is 0, which ranks it above every real answer.
        lowest = min(v[0] for v in values)
        sums = np.array([by_text[t][0] if by_text[t][2] else lowest for t in texts], dtype=float)
        counts = np.array([max(by_text[t][2], 1) for t in texts], dtype=float)
        return sums, counts


def record(feedback: Any, instruction: Instruction, chosen: Selection, **details: Any) -> Selection:
    """``chosen`` stored in the feedback store ``feedback``, with its id set."""
    selection_id = feedback.record(
        instruction,
        [c.response for c in chosen.candidates],
        chosen.index,
        scores=[c.score for c in chosen.candidates],
        **details,
    )
    return replace(chosen, id=selection_id)


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
