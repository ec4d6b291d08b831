"""Scoring candidate messages and choosing one: shared by the best-of-n model and the middleware."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage

from langchain_capplug._sampling import candidate_text, dedupe, has_tool_calls, short_error


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


@dataclass
class Selection:
    """The outcome of choosing among candidates; ``metadata`` goes into ``response_metadata``."""

    index: int  # into the messages given to :func:`select`
    metadata: dict[str, Any] = field(default_factory=dict)


def select(
    scorer: Any,
    conversation: Sequence[BaseMessage],
    messages: Sequence[BaseMessage],
    *,
    n_requested: int,
    failures: Sequence[BaseException] = (),
    score_tool_calls: bool = False,
) -> Selection:
    """Choose the best of ``messages`` for ``conversation``.

    Repeats are scored once. When tool calls are not scored and any candidate carries them, the
    first such candidate is chosen unscored (``scores`` is ``None`` and ``reason`` says why).
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
    distinct = dedupe(messages)
    texts = [candidate_text(messages[i]) for i in distinct]
    scores = [float(s) for s in scorer.score(list(conversation), texts)]
    best = max(range(len(texts)), key=scores.__getitem__)
    return Selection(
        distinct[best],
        {**base, "candidates": texts, "scores": scores, "chosen": best},
    )


def with_metadata(message: BaseMessage, metadata: dict[str, Any]) -> BaseMessage:
    """A copy of ``message`` with ``response_metadata["capplug"]`` set."""
    response_metadata = {**message.response_metadata, "capplug": metadata}
    return message.model_copy(update={"response_metadata": response_metadata})
