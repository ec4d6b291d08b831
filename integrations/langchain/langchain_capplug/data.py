"""Scorer training data labelled with any LangChain chat model.

``ChatModelCandidateSource`` plugs a chat model (a larger model, a remote cluster, anything
LangChain can call) into capplug's data build as the candidate generator:

.. code-block:: python

    from capplug.data.build import build_dataset
    from langchain_capplug.data import ChatModelCandidateSource

    source = ChatModelCandidateSource(ChatOpenAI(model="gpt-4o-mini"), n=8)
    build_dataset("data/scorer", source=source, tasks=[...])
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from langchain_core.messages import HumanMessage
from langchain_core.runnables import Runnable

from capplug.llms.retry import DEFAULT_RETRY, RetryPolicy
from langchain_capplug._sampling import (
    candidate_text,
    collect,
    sampler_for,
    supports_native_n,
    unwrap,
)

__all__ = ["ChatModelCandidateSource"]


class ChatModelCandidateSource:
    """``n`` candidates per prompt from a LangChain chat model, for ``capplug data build``.

    Candidates are sampled at ``temperature`` when the model is set to 0, in one request where
    the model has an ``n`` setting and by concurrent calls otherwise, each through capplug's
    retry policy. A prompt whose candidates all failed raises the last error (the build then
    stops, and resumes from the unfinished task when run again).
    """

    def __init__(
        self,
        llm: Runnable,
        *,
        n: int = 8,
        temperature: float = 0.9,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        max_concurrency: int = 8,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        model, self._bound = unwrap(llm)
        self._model = sampler_for(model, temperature=temperature, retries_off=retry is not None)
        self.n = n
        self.retry = retry
        self.max_concurrency = max_concurrency
        params = self._model._get_ls_params()
        self.settings = f"{params.get('ls_provider', model._llm_type)}:temperature={temperature}"
        self.name = json.dumps(
            {
                "model": str(params.get("ls_model_name") or model._llm_type),
                "strategies": f"{self.settings}x{n}",
                "seed": None,
            },
            sort_keys=True,
        )

    def candidates(self, prompts: Sequence[str]) -> list[list[tuple[str, str]]]:
        out = []
        for prompt in prompts:
            collected = collect(
                self._model,
                [HumanMessage(prompt)],
                n=self.n,
                native=supports_native_n(self._model),
                options=dict(self._bound),
                retry=self.retry,
                max_concurrency=self.max_concurrency,
            )
            if not collected.received and collected.failures:
                raise collected.failures[-1]
            out.append([(candidate_text(m), self.settings) for m in collected.received])
        return out
