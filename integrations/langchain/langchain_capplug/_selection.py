"""Choosing among candidate messages: capplug's one selection path, fed from LangChain messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from langchain_capplug._sampling import candidate_text, has_tool_calls

if TYPE_CHECKING:
    from capplug.selection import Selection


SURFACE = "langchain"
"""What the feedback store records as the surface of choices made here."""


def load_scorer(scorer: Any) -> Any:
    """A capplug ``Scorer`` from a scorer object, a reference, or ``None`` (the default)."""
    from capplug.scoring import load_scorer as load

    return load(scorer)


def load_reranker(scorer: Any, *, documents: bool = False) -> Any:
    """A capplug ``Reranker``: given, or built on a scorer object, reference or ``None`` (with
    ``documents``, weighting the scorer alone: agreement among documents is no signal)."""
    from capplug.selection import SCORER_ONLY, Reranker

    if isinstance(scorer, Reranker):
        return scorer
    return Reranker(load_scorer(scorer), combiner=SCORER_ONLY if documents else None)


def select(
    reranker: Any,
    conversation: Any,
    messages: Sequence[BaseMessage],
    *,
    score_tool_calls: bool = False,
    **changes: Any,
) -> Selection:
    """Choose the best of ``messages`` for ``conversation`` through capplug's selection path
    (:class:`capplug.selection.Selector`, configured by ``reranker``, with ``changes`` to its
    fields: the callback handler's own ``feedback``, say).

    When tool calls are not scored and any candidate carries them, the first such candidate is
    chosen unscored (:meth:`Selection.unscored`, with the reason). Otherwise every candidate
    goes to the path (repeats are scored once and count towards agreement), with
    log-probabilities by the one rule (:func:`capplug.selection.reply_logprobs`).
    """
    from capplug.selection import TOOL_CALLS_UNSCORED, Selection, reply_logprobs, tool_call_order

    if not messages:
        raise ValueError("no candidates to choose from")
    texts = [candidate_text(m) for m in messages]
    if not score_tool_calls:
        order = tool_call_order([has_tool_calls(m) for m in messages])
        if order is not None:
            reason = f"{TOOL_CALLS_UNSCORED} (score_tool_calls=False)"
            return Selection.unscored(texts, order, reason)
    logprobs, counts = reply_logprobs([m.response_metadata.get("logprobs") for m in messages])
    path = reranker.selector(**{"surface": SURFACE, **changes})
    return path.select(conversation, texts, logprobs=logprobs, token_counts=counts)


def with_metadata(message: BaseMessage, metadata: dict[str, Any]) -> BaseMessage:
    """A copy of ``message`` with ``response_metadata["capplug"]`` set."""
    response_metadata = {**message.response_metadata, "capplug": metadata}
    return message.model_copy(update={"response_metadata": response_metadata})


SELECTION_RUN = "capplug_selection"
"""The name of the child run that records each choice in traces (LangSmith and any tracer)."""
SELECTION_TAG = "capplug-selection"


def _trace_parts(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(searchable run metadata, outputs) of a choice's trace run."""
    chosen = metadata.get("chosen")
    scores = metadata.get("scores")
    searchable = {
        "capplug_chosen": chosen,
        "capplug_score": scores[chosen] if scores and chosen is not None else None,
        "capplug_n_received": metadata.get("n_received"),
        "capplug_failures": metadata.get("failures"),
        "capplug_reason": metadata.get("reason"),
    }
    outputs = {k: metadata.get(k) for k in ("chosen", "scores", "signals", "weights", "reason")}
    return {k: v for k, v in searchable.items() if v is not None}, outputs


def _selection_run(run_manager: Any, metadata: dict[str, Any]) -> tuple[Any, dict, dict]:
    """(callback manager for the child run or None, its inputs, its outputs)."""
    from langchain_capplug._sampling import child_callbacks

    manager = child_callbacks(run_manager)
    searchable, outputs = _trace_parts(metadata)
    if manager is not None:
        manager.add_tags([SELECTION_TAG], inherit=False)
        manager.add_metadata(searchable, inherit=False)
    return manager, {"candidates": metadata.get("candidates")}, outputs


def trace_selection(run_manager: Any, metadata: dict[str, Any]) -> None:
    """Record a choice as a child run of the best-of-n run: its candidates in, the scores and the
    chosen index out, and flat ``capplug_*`` metadata to filter runs by in LangSmith."""
    manager, inputs, outputs = _selection_run(run_manager, metadata)
    if manager is not None:
        manager.on_chain_start(None, inputs, name=SELECTION_RUN).on_chain_end(outputs)


async def atrace_selection(run_manager: Any, metadata: dict[str, Any]) -> None:
    """:func:`trace_selection` for async callbacks."""
    manager, inputs, outputs = _selection_run(run_manager, metadata)
    if manager is not None:
        run = await manager.on_chain_start(None, inputs, name=SELECTION_RUN)
        await run.on_chain_end(outputs)
