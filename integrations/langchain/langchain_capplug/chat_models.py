"""``CappyBestOfN``: any chat model, n candidates per call, the one capplug's scorer likes best."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from capplug.llms.collect import Collected, names_parameter
from capplug.llms.retry import DEFAULT_RETRY, RetryPolicy
from langchain_capplug._sampling import (
    CANDIDATE_TAGS,
    SamplerCache,
    acollect,
    child_callbacks,
    collect,
    supports_native_n,
    unwrap,
)
from langchain_capplug._selection import (
    atrace_selection,
    load_reranker,
    select,
    trace_selection,
    with_metadata,
)

__all__ = ["CappyBestOfN"]


class CappyBestOfN(BaseChatModel):
    """Best-of-n from any chat model, chosen by capplug's scorer.

    Each call asks ``llm`` for ``n`` candidates: natively in one request where the model has an
    ``n`` setting (``ChatOpenAI`` and other OpenAI-compatible models; through ``generate``, since
    ``invoke`` keeps only the first choice), and by ``n`` concurrent calls otherwise, or to make up for choices that did not come back. Every upstream
    call samples at ``temperature`` when the model is set to 0 (or has no temperature), and
    goes through ``retry`` (capplug's shared policy) with the model's own SDK retries off.
    Repeats are removed, the rest are scored against the whole conversation, and the best comes
    back as an ``AIMessage`` whose ``response_metadata["capplug"]`` holds ``scores``,
    ``chosen`` (index into ``candidates``), ``candidates``, ``n_requested``, ``n_received``,
    ``failures`` and ``errors``.

    When some calls still fail after their retries, the best of those that arrived is returned
    if at least ``min_candidates`` arrived; otherwise the last error is raised.

    Tool calls: a candidate carrying tool calls is returned as the model gave it, unscored (the
    first such candidate), unless ``score_tool_calls=True``, in which case tool calls are scored
    as JSON text beside the message text. ``bind_tools`` binds the tools to the inner model.

    It is a chat model itself, so it composes with ``|``, prompts, parsers and agents, and has
    ``invoke``/``ainvoke``/``batch``/``abatch``; ``stream`` yields the chosen message once, when
    it has been chosen.

    Example:
        .. code-block:: python

            from langchain_openai import ChatOpenAI
            from langchain_capplug import CappyBestOfN

            best = CappyBestOfN(llm=ChatOpenAI(model="gpt-4o-mini"), n=8)
            reply = best.invoke("Name three prime numbers above 100.")
            reply.response_metadata["capplug"]["scores"]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: Runnable = Field(description="The chat model to sample from (optionally bound).")
    scorer: Any = Field(
        default=None,
        description="A capplug Scorer, a scorer reference, a capplug Reranker (the selection core "
        "with its weights), or None for capplug's default scorer and its selection weights.",
    )
    n: int = Field(default=4, ge=1, le=128, description="Candidates to request per call.")
    temperature: float = Field(
        default=0.8, gt=0, description="Temperature for fan-out calls to a model set to 0."
    )
    native_n: bool | None = Field(
        default=None,
        description="Request n choices in one call; None: when the model has an `n` setting.",
    )
    min_candidates: int = Field(default=1, ge=1)
    request_logprobs: bool = Field(
        default=True,
        description="Ask the model for token log-probabilities (a selection signal) when it has "
        "an unset `logprobs` setting; an endpoint that refuses them is asked again without, and "
        "not asked again.",
    )
    score_tool_calls: bool = False
    max_concurrency: int = Field(default=8, ge=1, description="Concurrent fan-out calls.")
    retry: RetryPolicy | None = Field(
        default=DEFAULT_RETRY, description="Retry policy for each upstream call; None: no retries."
    )

    _samplers: SamplerCache = PrivateAttr(default_factory=SamplerCache)
    _reranker: Any = PrivateAttr(default=None)

    @field_validator("llm")
    @classmethod
    def _check_llm(cls, llm: Runnable) -> Runnable:
        unwrap(llm)  # raises a clear TypeError for anything that is not a chat model
        return llm

    @model_validator(mode="after")
    def _load(self) -> CappyBestOfN:
        self._reranker = load_reranker(self.scorer)
        self.scorer = self._reranker.scorer
        if self.min_candidates > self.n:
            raise ValueError(f"min_candidates ({self.min_candidates}) exceeds n ({self.n})")
        return self

    @property
    def _llm_type(self) -> str:
        return "capplug-best-of-n"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        model, _ = unwrap(self.llm)
        return {"llm": model._llm_type, "n": self.n, "scorer": repr(self.scorer)}

    def bind_tools(
        self, tools: Sequence[Any], **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools for the inner model; candidates are then sampled with the tools.

        The inner model formats the tools; the call arguments its ``bind_tools`` binds (``tools``,
        ``tool_choice``, ...) are bound here, so they take precedence over any bound to ``llm``
        and a later ``bind_tools`` replaces them, as it would on the inner model.
        """
        model, bound = unwrap(self.llm)
        inner = model.bind_tools(tools, **kwargs)
        if isinstance(inner, RunnableBinding):
            tool_model, tool_kwargs = unwrap(inner)
            if tool_model is model:
                return self.bind(**tool_kwargs)
        if bound:  # a bind_tools that built another model: sample from that one
            inner = inner.bind(**bound)
        return self.model_copy(update={"llm": inner})

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """Tracing parameters of the model the candidates come from, as it is sampled."""
        sampler, bound = self._sampler()
        options = {**bound, **kwargs}
        bound_stop = options.pop("stop", None)
        return sampler._get_ls_params(stop=stop if stop is not None else bound_stop, **options)

    # ------------------------------------------------------------------ candidates

    def _sampler(self, *, logprobs: bool = False) -> tuple[BaseChatModel, dict[str, Any]]:
        """The model to sample from (temperature > 0, SDK retries off, with ``logprobs`` asking
        for them where it can) and its bound kwargs."""
        model, bound = unwrap(self.llm)
        sampler = self._samplers.get(
            model,
            temperature=self.temperature,
            retries_off=self.retry is not None,
            logprobs=logprobs,
        )
        return sampler, bound

    def _refused_logprobs(self, sampler: BaseChatModel, collected: Collected[Any]) -> bool:
        """True (and remembered) when nothing arrived because the endpoint refused logprobs."""
        plain, _ = self._sampler()
        errors = collected.errors
        if sampler is plain or collected.received or not errors:
            return False
        if not all(names_parameter(e, "logprobs") for e in errors):
            return False
        self._samplers.refuses_logprobs(unwrap(self.llm)[0])
        return True

    def _call_options(
        self, stop: list[str] | None, run_manager: Any, kwargs: dict[str, Any]
    ) -> tuple[BaseChatModel, dict[str, Any]]:
        """The sampling model and the options of each candidate call (bound ones first)."""
        sampler, bound = self._sampler(logprobs=self.request_logprobs)
        options = {
            **bound,
            **kwargs,
            "stop": stop if stop is not None else bound.get("stop"),
            "callbacks": child_callbacks(run_manager),
            "tags": CANDIDATE_TAGS,
        }
        return sampler, options

    def with_fallbacks(self, fallbacks: Sequence[Runnable], **kwargs: Any) -> Any:
        """LangChain's ``with_fallbacks``, with capplug's retries stepping aside: the wrapped copy
        makes one attempt per candidate call, so a failing endpoint hands over to the fallbacks
        at its first error instead of after every backoff. (To retry first and fall back after,
        build ``RunnableWithFallbacks(runnable=best, fallbacks=[...])`` yourself.)"""
        primary = self
        if self.retry is not None and self.retry.max_attempts > 1:
            primary = self.model_copy(update={"retry": self.retry.with_options(max_attempts=1)})
        return Runnable.with_fallbacks(primary, fallbacks, **kwargs)

    def _use_native(self, model: BaseChatModel) -> bool:
        return supports_native_n(model) if self.native_n is None else self.native_n

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        sampler, options = self._call_options(stop, run_manager, kwargs)
        collected = collect(
            sampler,
            messages,
            n=self.n,
            native=self._use_native(sampler),
            options=options,
            retry=self.retry,
            max_concurrency=self.max_concurrency,
        )
        if self._refused_logprobs(sampler, collected):
            return self._generate(messages, stop, run_manager, **kwargs)
        result = self._choose(messages, collected)
        trace_selection(run_manager, result.llm_output["capplug"])
        return result

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        sampler, options = self._call_options(stop, run_manager, kwargs)
        collected = await acollect(
            sampler,
            messages,
            n=self.n,
            native=self._use_native(sampler),
            options=options,
            retry=self.retry,
            max_concurrency=self.max_concurrency,
        )
        if self._refused_logprobs(sampler, collected):
            return await self._agenerate(messages, stop, run_manager, **kwargs)
        result = await asyncio.to_thread(self._choose, messages, collected)
        await atrace_selection(run_manager, result.llm_output["capplug"])
        return result

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # Candidates are not streamed: the chosen one is yielded whole once it is known.
        chunk = _as_chunk(self._generate(messages, stop, run_manager, **kwargs))
        if run_manager is not None:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunk = _as_chunk(await self._agenerate(messages, stop, run_manager, **kwargs))
        if run_manager is not None:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk

    def _choose(
        self,
        conversation: list[BaseMessage],
        collected: Collected[BaseMessage],
    ) -> ChatResult:
        received = collected.received
        if len(received) < self.min_candidates:
            if collected.failures:
                raise collected.failures[-1]
            raise ValueError(
                f"the model returned {len(received)} candidates; min_candidates is "
                f"{self.min_candidates}"
            )
        selection = select(
            self._reranker, conversation, received, score_tool_calls=self.score_tool_calls
        )
        metadata = {**collected.metadata(self.n), **selection.metadata()}
        chosen = with_metadata(received[selection.index], metadata)
        return ChatResult(
            generations=[ChatGeneration(message=chosen)],
            llm_output={"capplug": metadata},
        )


def _as_chunk(result: ChatResult) -> ChatGenerationChunk:
    message = result.generations[0].message
    return ChatGenerationChunk(message=AIMessageChunk(**message.model_dump(exclude={"type"})))
