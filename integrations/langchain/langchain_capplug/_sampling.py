"""Getting n candidate messages from any LangChain chat model, and the shared bookkeeping.

Shared by the best-of-n chat model and the agent middleware: how to unwrap a bound model, how to
make a sampling copy of a model (temperature > 0, SDK retries off), how to turn a candidate into
the text the scorer reads (de-duplication is capplug.selection's).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables import Runnable, RunnableBinding

from capplug.llms.collect import Collected, seed_for
from capplug.llms.collect import acollect as acollect_n
from capplug.llms.collect import collect as collect_n
from capplug.llms.retry import RetryPolicy

logger = logging.getLogger("langchain_capplug")

# Inner candidate calls carry these tags: the first names them in traces; LangGraph's
# "messages" stream mode skips runs tagged "nostream", so candidates do not leak token by token
# into an agent's stream before one is chosen.
CANDIDATE_TAGS = ["capplug-candidate", "nostream"]

# Fields a re-built client model must not copy over: the validator makes them afresh.
_CLIENT_FIELDS = frozenset({"client", "async_client", "root_client", "root_async_client"})


def unwrap(llm: Runnable) -> tuple[BaseChatModel, dict[str, Any]]:
    """The chat model under ``llm`` and the keyword arguments bound to it (``bind_tools`` etc.)."""
    kwargs: dict[str, Any] = {}
    while isinstance(llm, RunnableBinding):
        kwargs = {**llm.kwargs, **kwargs}
        llm = llm.bound
    if not isinstance(llm, BaseChatModel):
        raise TypeError(
            f"expected a LangChain chat model (BaseChatModel, optionally with bound arguments); "
            f"got {type(llm).__name__}"
        )
    return llm, kwargs


def child_callbacks(
    run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> CallbackManager | AsyncCallbackManager | None:
    """Callbacks for the candidate calls, nested under the best-of-n run in traces."""
    if run_manager is None:
        return None
    cls = (
        AsyncCallbackManager
        if isinstance(run_manager, AsyncCallbackManagerForLLMRun)
        else CallbackManager
    )
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return manager


def supports_native_n(model: BaseChatModel) -> bool:
    """True when the model has an ``n`` setting that asks its API for several choices at once."""
    return "n" in type(model).model_fields


def without_retries(model: BaseChatModel) -> BaseChatModel:
    """A copy of ``model`` whose SDK does not retry (capplug's policy retries instead).

    Models with a ``max_retries`` setting are rebuilt with ``max_retries=0`` from the settings
    the user gave, so their SDK client is built afresh; other models are returned unchanged.
    """
    fields = type(model).model_fields
    if "max_retries" not in fields or getattr(model, "max_retries", None) == 0:
        return model
    settings = {
        name: getattr(model, name) for name in model.model_fields_set if name not in _CLIENT_FIELDS
    }
    settings["max_retries"] = 0
    try:
        return type(model)(**settings)
    except Exception as error:  # a model whose settings do not round-trip: keep it as it is
        logger.warning(
            "could not turn off %s's own retries (%s); its SDK and capplug may both retry",
            type(model).__name__,
            error,
        )
        return model


def sampling_copy(model: BaseChatModel, temperature: float) -> BaseChatModel:
    """``model`` with a sampling temperature, for fan-out calls that must differ from each other.

    A model with no ``temperature`` setting is used as it is (its answers may repeat; repeats are
    de-duplicated before scoring).
    """
    if "temperature" not in type(model).model_fields:
        return model
    current = getattr(model, "temperature", None)
    if current is not None and current > 0:
        return model
    return model.model_copy(update={"temperature": temperature})


def with_logprobs(model: BaseChatModel) -> BaseChatModel:
    """``model`` asking for token log-probabilities (a selection signal), when it has a
    ``logprobs`` setting the user left unset (``ChatOpenAI`` and its kin); else ``model``."""
    if "logprobs" not in type(model).model_fields or getattr(model, "logprobs", None) is not None:
        return model
    return model.model_copy(update={"logprobs": True})


def sampler_for(
    model: BaseChatModel, *, temperature: float, retries_off: bool, logprobs: bool = False
) -> BaseChatModel:
    """``model`` ready to draw candidates: SDK retries off (when capplug retries), temperature > 0,
    and with ``logprobs``, asking for log-probabilities where it can."""
    sampler = sampling_copy(without_retries(model) if retries_off else model, temperature)
    return with_logprobs(sampler) if logprobs else sampler


class SamplerCache:
    """Sampling copies of chat models (SDK retries off, temperature > 0), made once per model.

    Rebuilding a model (and its SDK client) on every call would put that work on the hot path;
    entries hold their model, so an id is never mistaken for a later model's.
    """

    def __init__(self) -> None:
        self._copies: dict[tuple[int, float, bool, bool], tuple[BaseChatModel, BaseChatModel]] = {}
        self._refuse_logprobs: set[int] = set()

    def get(
        self,
        model: BaseChatModel,
        *,
        temperature: float,
        retries_off: bool,
        logprobs: bool = False,
    ) -> BaseChatModel:
        logprobs = logprobs and id(model) not in self._refuse_logprobs
        key = (id(model), temperature, retries_off, logprobs)
        entry = self._copies.get(key)
        if entry is None or entry[0] is not model:
            sampler = sampler_for(
                model, temperature=temperature, retries_off=retries_off, logprobs=logprobs
            )
            entry = (model, sampler)
            self._copies[key] = entry
        return entry[1]

    def refuses_logprobs(self, model: BaseChatModel) -> None:
        """Remember that ``model``'s endpoint refused ``logprobs``: stop asking for them."""
        if id(model) not in self._refuse_logprobs:
            logger.info("%s refused logprobs; not asking for them again", type(model).__name__)
        self._refuse_logprobs.add(id(model))


def has_tool_calls(message: BaseMessage) -> bool:
    return isinstance(message, AIMessage) and bool(message.tool_calls)


def candidate_text(message: BaseMessage) -> str:
    """What the scorer reads for a candidate: its text, then any tool calls as JSON."""
    text = message.text if isinstance(message.text, str) else str(message.content)
    if has_tool_calls(message):
        calls = [{"name": c["name"], "args": c["args"]} for c in message.tool_calls]
        text = (text + "\n" if text else "") + json.dumps(calls, sort_keys=True, default=str)
    return text


# ---------------------------------------------------------------------------- collecting


def _messages(result: LLMResult) -> list[BaseMessage]:
    """The candidates one upstream call returned, each with the call's ``llm_output``.

    LangChain merges ``llm_output`` (``model_name``, ``token_usage``, ...) into the message's
    ``response_metadata`` only when a call returns one choice; the choices of a native-``n``
    call get it here, so the chosen one names its model (usage callbacks need the name).
    """
    extra = result.llm_output or {}
    return [
        g.message.model_copy(update={"response_metadata": {**extra, **g.message.response_metadata}})
        if extra
        else g.message
        for g in result.generations[0]
    ]


def collect(
    model: BaseChatModel,
    messages: list[BaseMessage],
    *,
    n: int,
    native: bool,
    options: dict[str, Any],
    retry: RetryPolicy | None,
    max_concurrency: int,
) -> Collected[BaseMessage]:
    """``n`` candidate messages from ``model`` by capplug's one policy
    (:mod:`capplug.llms.collect`): with ``native``, one ``generate(n=n)`` call first, then
    concurrent single calls for any shortfall, the ``k``-th with a bound seed offset by ``k``.
    Each call goes through ``retry``."""

    def call(n: int | None, k: int) -> list[BaseMessage]:
        extra = _call_options(options, n, k)
        if retry is None:
            return _messages(model.generate([messages], **extra))
        return _messages(retry.call(model.generate, [messages], **extra))

    return collect_n(call, n, native=native, max_concurrency=max_concurrency)


async def acollect(
    model: BaseChatModel,
    messages: list[BaseMessage],
    *,
    n: int,
    native: bool,
    options: dict[str, Any],
    retry: RetryPolicy | None,
    max_concurrency: int,
) -> Collected[BaseMessage]:
    """The async counterpart of :func:`collect`."""

    async def call(n: int | None, k: int) -> list[BaseMessage]:
        extra = _call_options(options, n, k)
        if retry is None:
            return _messages(await model.agenerate([messages], **extra))
        return _messages(await retry.acall(model.agenerate, [messages], **extra))

    return await acollect_n(call, n, native=native, max_concurrency=max_concurrency)


def _call_options(options: dict[str, Any], n: int | None, k: int) -> dict[str, Any]:
    """The options of one candidate call: ``n`` for the call asking for all, a seed offset by
    the candidate's index for a single one."""
    out = dict(options)
    if n is not None:
        out["n"] = n
    if out.get("seed") is not None:
        out["seed"] = seed_for(out["seed"], k)
    return out
