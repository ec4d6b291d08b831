"""Observe-only scoring of every generation a model makes: a callback handler and its async twin."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult

from langchain_capplug._selection import load_reranker, select

__all__ = ["AsyncCappyScoreCallbackHandler", "CappyScoreCallbackHandler", "ScoreRecord"]

logger = logging.getLogger("langchain_capplug.callbacks")


@dataclass(frozen=True)
class ScoreRecord:
    """The scores of one prompt's generations in one model run, chosen among through capplug's
    selection path (repeats scored once; log-probabilities when every generation has them)."""

    run_id: str
    parent_run_id: str | None
    prompt_index: int
    instruction: str
    responses: list[str]
    scores: list[float]
    """The scorer's score of each response."""
    best: int
    """The response capplug's selection core would choose (the highest ``fused``): the scorer's
    scores fused with the responses' agreement, so not always the highest score."""
    fused: list[float] = field(default_factory=list)
    """The selection core's probability that each response is the best."""
    selection_id: str | None = None
    """Its id in the handler's feedback store (``feedback=``): judge it with ``handler.judge``."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The ``capplug`` metadata of the choice, as every surface reports it
    (:meth:`capplug.selection.Selection.metadata`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Sink = list | logging.Logger | Callable[[ScoreRecord], Any]


def _deliver(sink: Sink, record: ScoreRecord) -> None:
    if isinstance(sink, list):
        sink.append(record)
    elif isinstance(sink, logging.Logger):
        sink.info("capplug scores %s", json.dumps(record.to_dict(), ensure_ascii=False))
    else:
        sink(record)


def _check_sink(sink: Any) -> Sink:
    if sink is None:
        return logger
    if isinstance(sink, list | logging.Logger) or callable(sink):
        return sink
    raise TypeError(
        f"sink must be a list, a logging.Logger or a function of one ScoreRecord; "
        f"got {type(sink).__name__}"
    )


_MAX_REMEMBERED_RUNS = 10_000


class _Scoring:
    """The state both handlers share: prompts by run id, turning a result into records, and
    feedback on them (stored, and forwarded to LangSmith when a client is given)."""

    def __init__(
        self, scorer: Any, sink: Any, feedback: Any, langsmith: Any, auto_adapt: Any
    ) -> None:
        from capplug.feedback import as_feedback_store, check_watcher

        if langsmith is not None and not callable(getattr(langsmith, "create_feedback", None)):
            raise TypeError(
                "langsmith must be a langsmith.Client (with create_feedback); "
                f"got {type(langsmith).__name__}"
            )
        self._reranker = load_reranker(scorer)
        self.scorer = self._reranker.scorer
        self.sink = _check_sink(sink)
        self.feedback = as_feedback_store(feedback)
        self.langsmith = langsmith
        self.auto_adapter = check_watcher(auto_adapt, self.feedback, owner="the handler")
        self._prompts: dict[UUID, list[Any]] = {}
        self._runs: dict[str, str] = {}  # selection id -> the LangSmith run it was made in
        self._lock = threading.Lock()

    def judge(self, selection_id: str, run_id: str | None, **judgement: Any) -> Any:
        """Store a judgement of a recorded selection; forward it to LangSmith when a client was
        given (``capplug`` feedback on the model run that produced the selection)."""
        from capplug.feedback import judge_selection

        stored = judge_selection(
            self.feedback,
            selection_id,
            owner="this handler",
            watcher=self.auto_adapter,
            **judgement,
        )
        run = run_id or self._runs.get(selection_id)
        if self.langsmith is not None and run is not None:
            score: float | None = stored.label
            if stored.kind == "preferred":
                chosen = self.feedback.selection(selection_id)["chosen"]
                score = float(stored.candidate == chosen)  # was the chosen answer the one wanted
            try:
                self.langsmith.create_feedback(
                    run,
                    key="capplug",
                    score=score,
                    value=stored.candidate,
                    correction=None if stored.reference is None else {"output": stored.reference},
                    comment=stored.source,
                    extra={"selection_id": selection_id, "kind": stored.kind},
                )
            except Exception:  # stored either way; LangSmith being down loses nothing here
                logger.exception("capplug could not forward feedback on %s to LangSmith", run)
        return stored

    def remember(self, run_id: UUID, prompts: Sequence[Any]) -> None:
        with self._lock:
            self._prompts[run_id] = list(prompts)

    def forget(self, run_id: UUID) -> list[Any] | None:
        with self._lock:
            return self._prompts.pop(run_id, None)

    def records(
        self, prompts: list[Any], response: LLMResult, run_id: UUID, parent_run_id: UUID | None
    ) -> list[ScoreRecord]:
        from capplug import flatten_chat

        out = []
        for index, (prompt, generations) in enumerate(
            zip(prompts, response.generations, strict=False)
        ):
            if not generations:
                continue
            messages = [_message(g) for g in generations]
            # The handler's own feedback store; every generation is scored, a lone one too.
            chosen = select(
                self._reranker,
                prompt,
                messages,
                score_tool_calls=True,
                feedback=self.feedback,
                score_single=True,
            )
            if chosen.id is not None:
                with self._lock:
                    self._runs[chosen.id] = str(run_id)
                    while len(self._runs) > _MAX_REMEMBERED_RUNS:
                        self._runs.pop(next(iter(self._runs)))
            out.append(
                ScoreRecord(
                    run_id=str(run_id),
                    parent_run_id=str(parent_run_id) if parent_run_id else None,
                    prompt_index=index,
                    instruction=flatten_chat(prompt),
                    responses=[c.response for c in chosen.candidates],
                    scores=[
                        c.signals["scorer"] for c in chosen.candidates if "scorer" in c.signals
                    ],
                    best=chosen.index,
                    fused=[round(c.score, 6) for c in chosen.candidates],
                    selection_id=chosen.id,
                    metadata=chosen.metadata(),
                )
            )
        return out

    def score_and_deliver(
        self, response: LLMResult, run_id: UUID, parent_run_id: UUID | None
    ) -> None:
        prompts = self.forget(run_id)
        if prompts is None:
            return
        try:
            for record in self.records(prompts, response, run_id, parent_run_id):
                _deliver(self.sink, record)
        except Exception:  # observe-only: a scoring failure never touches the model's result
            logger.exception("capplug could not score run %s", run_id)


def _message(generation: Generation) -> BaseMessage:
    """A generation as the message the selection reads (a plain LLM's text as an AI message)."""
    if isinstance(generation, ChatGeneration):
        return generation.message
    return AIMessage(content=generation.text)


class _Handler:
    """What both handlers share: their scoring state, its scorer and feedback store, judging."""

    def __init__(
        self,
        scorer: Any = None,
        sink: Any = None,
        *,
        feedback: Any = None,
        langsmith: Any = None,
        auto_adapt: Any = None,
    ) -> None:
        super().__init__()
        self._scoring = _Scoring(scorer, sink, feedback, langsmith, auto_adapt)

    @property
    def scorer(self) -> Any:
        return self._scoring.scorer

    @property
    def feedback(self) -> Any:
        """The feedback store selections are recorded in (``None`` without ``feedback=``)."""
        return self._scoring.feedback

    def judge(self, selection_id: str, *, run_id: str | None = None, **judgement: Any) -> Any:
        """Judge a recorded selection: exactly one of ``label`` (with ``candidate``),
        ``preferred`` or ``reference`` (and optionally ``source``), as
        :meth:`capplug.feedback.FeedbackStore.add` takes them. Forwarded to LangSmith when the
        handler has a client (on ``run_id``, by default the run the selection was made in)."""
        return self._scoring.judge(selection_id, run_id, **judgement)


class CappyScoreCallbackHandler(_Handler, BaseCallbackHandler):
    """Score every generation of the runs it watches and hand the scores to ``sink``.

    It only observes: the prompt is remembered at chat-model (or LLM) start by ``run_id``, every
    generation is scored at ``on_llm_end``, and one :class:`ScoreRecord` per prompt goes to the
    sink (a list to append to, a ``logging.Logger`` to log to at INFO, or a function). A scoring
    error is logged, never raised, and results are never changed. The generations are chosen
    among through capplug's selection path, as ``CappyBestOfN`` chooses: ``scorer`` is a capplug
    ``Scorer``, a reference, or a ``Reranker`` (its weights, signals and task scorers then
    apply; the handler's own ``feedback`` records).

    With ``feedback`` (``True``: the default store; or a path, or a ``FeedbackStore``) each
    record is also stored as a selection (``record.selection_id``), to be judged later with
    :meth:`judge`; with ``langsmith`` (a ``langsmith.Client``) each judgement is also sent to
    LangSmith as ``capplug`` feedback on the model run that produced it. With ``auto_adapt`` (a
    :class:`capplug.training.auto_adapt.AutoAdapter` watching the same feedback store) each
    judgement also tells it, and a task with enough judged selections gets a task scorer in the
    background (used by a ``capplug.Reranker(task_scorers=...)`` from its next selection on).

    Example:
        .. code-block:: python

            records = []
            llm.invoke("Capital of France?", config={"callbacks": [CappyScoreCallbackHandler(sink=records)]})
            records[0].scores
    """

    raise_error = False
    run_inline = True

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self._scoring.remember(run_id, messages)

    def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._scoring.remember(run_id, prompts)

    def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._scoring.score_and_deliver(response, run_id, parent_run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._scoring.forget(run_id)


class AsyncCappyScoreCallbackHandler(_Handler, AsyncCallbackHandler):
    """The async twin of :class:`CappyScoreCallbackHandler`; scoring runs in a worker thread."""

    raise_error = False

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self._scoring.remember(run_id, messages)

    async def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._scoring.remember(run_id, prompts)

    async def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        await asyncio.to_thread(self._scoring.score_and_deliver, response, run_id, parent_run_id)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._scoring.forget(run_id)
