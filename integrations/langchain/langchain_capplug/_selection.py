"""Choosing among candidate messages: capplug's selection core, fed from LangChain messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage

from langchain_capplug._sampling import candidate_text, has_tool_calls


def load_scorer(scorer: Any) -> Any:
    """A capplug ``Scorer`` from a scorer object, a reference, or ``None`` (the default)."""
    from capplug.scoring import load_scorer as load

    return load(scorer)


def load_reranker(scorer: Any) -> Any:
    """A capplug ``Reranker``: given, or built on a scorer object, reference or ``None``."""
    from capplug.selection import Reranker

    if isinstance(scorer, Reranker):
        return scorer
    return Reranker(load_scorer(scorer))


@dataclass
class Selection:
    """The outcome of choosing among candidates; ``metadata`` goes into ``response_metadata``."""

    index: int  # into the messages given to :func:`select`
    metadata: dict[str, Any] = field(default_factory=dict)


def message_logprobs(message: BaseMessage) -> tuple[float, int] | None:
    """A candidate's summed token log-probability and token count, when the model sent them."""
    from capplug.selection import openai_logprobs

    return openai_logprobs(message.response_metadata.get("logprobs"))


def select(
    reranker: Any,
    conversation: Sequence[BaseMessage],
    messages: Sequence[BaseMessage],
    *,
    collected: dict[str, Any],
    score_tool_calls: bool = False,
) -> Selection:
    """Choose the best of ``messages`` for ``conversation`` with capplug's selection core.

    ``collected`` is the collecting half of the metadata
    (:meth:`capplug.llms.collect.Collected.metadata`). When tool calls are not scored and any
    candidate carries them, the first such candidate is chosen unscored (``scores`` is ``None``
    and ``reason`` says why). Otherwise every candidate goes to the core (repeats are scored once
    and count towards agreement), with log-probabilities when every candidate carries them.
    """
    from capplug.selection import TOOL_CALLS_UNSCORED, tool_call_order, unscored_metadata

    if not messages:
        raise ValueError("no candidates to choose from")
    texts = [candidate_text(m) for m in messages]
    if not score_tool_calls:
        order = tool_call_order([has_tool_calls(m) for m in messages])
        if order is not None:
            unscored = unscored_metadata(
                texts, order, f"{TOOL_CALLS_UNSCORED} (score_tool_calls=False)"
            )
            return Selection(order[0], {**collected, **unscored})
    found = [message_logprobs(m) for m in messages]
    have = all(f is not None for f in found)
    selection = reranker.select(
        list(conversation),
        texts,
        logprobs=[f[0] for f in found] if have else None,  # type: ignore[index]
        token_counts=[f[1] for f in found] if have else None,  # type: ignore[index]
    )
    return Selection(selection.index, {**collected, **selection.metadata()})


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
