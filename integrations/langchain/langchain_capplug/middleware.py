"""Agent middleware: best-of-n model responses at every step of a ``create_agent`` loop.

Needs the ``langchain`` package (``pip install 'langchain-capplug[agents]'``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage

from capplug.llms.collect import Collected, acollect, collect
from capplug.llms.retry import DEFAULT_RETRY, RetryPolicy

try:
    from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
except ImportError as error:  # pragma: no cover - exercised only without langchain installed
    raise ImportError(
        "CappyBestOfNMiddleware needs the langchain package: pip install 'langchain-capplug[agents]'"
    ) from error

from langchain_capplug._sampling import SamplerCache, has_tool_calls
from langchain_capplug._selection import load_reranker, select, with_metadata

__all__ = ["CappyBestOfNMiddleware"]


class CappyBestOfNMiddleware(AgentMiddleware):
    """Sample ``n`` model responses per agent step and keep the one capplug's scorer likes best.

    The first response is drawn alone. If it calls tools, the step is left as the model made it
    (no extra samples, no scoring) unless ``score_tool_calls=True``: tool-calling steps then get
    ``n`` samples too, scored with their calls as JSON. Otherwise ``n - 1`` more responses are
    drawn (concurrently), repeats removed, each scored against the system prompt and the
    conversation so far, and the best is kept; its ``response_metadata["capplug"]`` carries the
    scores, as with :class:`~langchain_capplug.CappyBestOfN`.

    Samples are drawn at ``temperature`` when the agent's model is set to 0, each through the
    shared retry policy with the model's SDK retries off. Extra samples that still fail are
    counted in the metadata; the step fails only when fewer than ``min_candidates`` arrived.
    Works in sync (``invoke``) and async (``ainvoke``) agent loops.

    Example:
        .. code-block:: python

            from langchain.agents import create_agent
            from langchain_capplug import CappyBestOfNMiddleware

            agent = create_agent(model, tools, middleware=[CappyBestOfNMiddleware(n=4)])
    """

    def __init__(
        self,
        *,
        scorer: Any = None,
        n: int = 4,
        temperature: float = 0.8,
        score_tool_calls: bool = False,
        min_candidates: int = 1,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = DEFAULT_RETRY,
    ) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        if not 1 <= min_candidates <= n:
            raise ValueError(f"min_candidates must be between 1 and n ({n}); got {min_candidates}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling; got {temperature}")
        self._reranker = load_reranker(scorer)
        self.scorer = self._reranker.scorer
        self.n = n
        self.temperature = temperature
        self.score_tool_calls = score_tool_calls
        self.min_candidates = min_candidates
        self.max_concurrency = max_concurrency
        self.retry = retry
        self._samplers = SamplerCache()

    @property
    def name(self) -> str:
        return "CappyBestOfNMiddleware"

    # ------------------------------------------------------------------ helpers

    def _sampling_request(self, request: ModelRequest) -> ModelRequest:
        sampler = self._samplers.get(
            request.model, temperature=self.temperature, retries_off=self.retry is not None
        )
        return request.override(model=sampler)

    def _call(self, handler: Callable[[ModelRequest], Any], request: ModelRequest) -> Any:
        return handler(request) if self.retry is None else self.retry.call(handler, request)

    async def _acall(
        self, handler: Callable[[ModelRequest], Awaitable[Any]], request: ModelRequest
    ) -> Any:
        if self.retry is None:
            return await handler(request)
        return await self.retry.acall(handler, request)

    async def _acall_one(
        self, handler: Callable[[ModelRequest], Awaitable[Any]], request: ModelRequest
    ) -> list[Any]:
        return [await self._acall(handler, request)]

    def _leave_alone(self, response: Any) -> bool:
        return self.n == 1 or (not self.score_tool_calls and has_tool_calls(_ai_message(response)))

    def _choose(self, request: ModelRequest, first: Any, more: Collected[Any]) -> Any:
        responses = [first, *more.received]
        if len(responses) < self.min_candidates:
            raise more.failures[-1]
        conversation: list[BaseMessage] = list(request.messages)
        if request.system_message is not None:
            conversation.insert(0, request.system_message)
        messages = [_ai_message(r) for r in responses]
        selection = select(
            self._reranker, conversation, messages, score_tool_calls=self.score_tool_calls
        )
        metadata = {
            **more.metadata(self.n),
            "n_received": len(responses),
            "upstream_calls": more.calls + 1,
            **selection.metadata(),
        }
        chosen = responses[selection.index]
        tagged = with_metadata(messages[selection.index], metadata)
        if isinstance(chosen, AIMessage):
            return ModelResponse(result=[tagged])
        result = [tagged if m is messages[selection.index] else m for m in chosen.result]
        return ModelResponse(result=result, structured_response=chosen.structured_response)

    # ------------------------------------------------------------------ hooks

    def wrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], ModelResponse],
    ) -> ModelResponse:
        request = self._sampling_request(request)
        first = self._call(handler, request)
        if self._leave_alone(first):
            return first
        # The first answer decided that there is something to choose: the rest of the n.
        more = collect(
            lambda _n, _k: [self._call(handler, request)],
            self.n - 1,
            native=False,
            max_concurrency=self.max_concurrency,
        )
        return self._choose(request, first, more)

    async def awrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], Awaitable[ModelResponse]],
    ) -> ModelResponse:
        request = self._sampling_request(request)
        first = await self._acall(handler, request)
        if self._leave_alone(first):
            return first
        more = await acollect(
            lambda _n, _k: self._acall_one(handler, request),
            self.n - 1,
            native=False,
            max_concurrency=self.max_concurrency,
        )
        return await asyncio.to_thread(self._choose, request, first, more)


def _ai_message(response: Any) -> AIMessage:
    if isinstance(response, AIMessage):
        return response
    for message in reversed(getattr(response, "result", [])):
        if isinstance(message, AIMessage):
            return message
    raise TypeError(f"the model call returned no AIMessage: {response!r}")
