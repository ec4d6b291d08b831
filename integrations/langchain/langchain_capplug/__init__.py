"""LangChain components for capplug: best-of-n from any chat model, scored by capplug's scorer.

- :class:`CappyBestOfN`: a chat model that samples n candidates from another and returns the best.
- :class:`CappyBestOfNMiddleware`: the same at every step of a ``create_agent`` loop (needs
  ``langchain``).
- :class:`CappyScoreCallbackHandler` / :class:`AsyncCappyScoreCallbackHandler`: observe-only
  scores of every generation.
- :class:`CappyCrossEncoder`: the scorer for ``CrossEncoderReranker``; :class:`CappyReranker`:
  a document compressor that keeps the best documents with their ``relevance_score``;
  :class:`BestGenerationParser`: the best of several generations.
"""

from __future__ import annotations

from typing import Any

from langchain_capplug.callbacks import (
    AsyncCappyScoreCallbackHandler,
    CappyScoreCallbackHandler,
    ScoreRecord,
)
from langchain_capplug.chat_models import CappyBestOfN
from langchain_capplug.cross_encoders import BestGenerationParser, CappyCrossEncoder, CappyReranker

__all__ = [
    "AsyncCappyScoreCallbackHandler",
    "BestGenerationParser",
    "CappyBestOfN",
    "CappyBestOfNMiddleware",
    "CappyCrossEncoder",
    "CappyReranker",
    "CappyScoreCallbackHandler",
    "ScoreRecord",
]


def __getattr__(name: str) -> Any:
    # The middleware needs the langchain package, an optional dependency: import it on use.
    if name == "CappyBestOfNMiddleware":
        from langchain_capplug.middleware import CappyBestOfNMiddleware

        return CappyBestOfNMiddleware
    raise AttributeError(f"module 'langchain_capplug' has no attribute {name!r}")
