"""Choosing among candidate messages: capplug's selection core, fed from LangChain messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage

from langchain_capplug._sampling import candidate_text, has_tool_calls, short_error


def load_scorer(scorer: Any) -> Any:
    """A capplug ``Scorer`` from a scorer object, a reference string, or ``None`` (the default)."""
    if scorer is None or isinstance(scorer, str):
        from capplug import Scorer

        return Scorer() if scorer is None else Scorer.from_pretrained(scorer)
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(
            f"scorer must be a capplug Scorer (or have .score(instruction, responses)); "
            f"got {type(scorer).__name__}"
        )
    return scorer


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
    n_requested: int,
    failures: Sequence[BaseException] = (),
    score_tool_calls: bool = False,
) -> Selection:
    """Choose the best of ``messages`` for ``conversation`` with capplug's selection core.

    When tool calls are not scored and any candidate carries them, the first such candidate is
    chosen unscored (``scores`` is ``None`` and ``reason`` says why). Otherwise every candidate
    goes to the core (repeats are scored once and count towards agreement), with log-probabilities
    when every candidate carries them.
    """
    if not messages:
        raise ValueError("no candidates to choose from")
    base = {
        "n_requested": n_requested,
        "n_received": len(messages),
        "failures": len(failures),
        "errors": [short_error(e) for e in failures],
    }
    if not score_tool_calls:
        with_tools = [i for i, m in enumerate(messages) if has_tool_calls(m)]
        if with_tools:
            chosen = with_tools[0]
            return Selection(
                chosen,
                {
                    **base,
                    "candidates": [candidate_text(messages[chosen])],
                    "scores": None,
                    "chosen": 0,
                    "reason": "tool calls are passed through unscored (score_tool_calls=False)",
                },
            )
    texts = [candidate_text(m) for m in messages]
    found = [message_logprobs(m) for m in messages]
    have = all(f is not None for f in found)
    selection = reranker.select(
        list(conversation),
        texts,
        logprobs=[f[0] for f in found] if have else None,  # type: ignore[index]
        token_counts=[f[1] for f in found] if have else None,  # type: ignore[index]
    )
    return Selection(selection.index, {**base, **selection.metadata()})


def with_metadata(message: BaseMessage, metadata: dict[str, Any]) -> BaseMessage:
    """A copy of ``message`` with ``response_metadata["capplug"]`` set."""
    response_metadata = {**message.response_metadata, "capplug": metadata}
    return message.model_copy(update={"response_metadata": response_metadata})
