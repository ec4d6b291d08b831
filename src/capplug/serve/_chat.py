"""What capplug's chat-completions servers share: request checks, prompt length and replies.

The local server (:mod:`capplug.serve.local_openai`) and the adapter service
(:mod:`capplug.serve.adapter_service`) read the same OpenAI chat-completions fields and answer with the
same ``chat.completion`` object; the checks here give both the same 400s, word for word.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, model_validator
from starlette.concurrency import run_in_threadpool

from capplug.serve._http import (
    BEARER,
    APIError,
    KeyHeader,
    check_json_value,
    error_response,
    json_path,
)

try:
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - no jinja2, no chat templates, no template errors
    _TemplateError = ValueError  # type: ignore[assignment,misc]

__all__ = [
    "MAX_STOP_SEQUENCES",
    "ChatRequest",
    "CheckedBody",
    "Sampling",
    "check_supported",
    "choices_wanted",
    "completion_json",
    "cut_at_stop",
    "max_tokens_wanted",
    "nucleus",
    "prompt_tokens",
    "stop_sequences",
    "stop_validator",
    "usage_json",
    "v1_key_headers",
    "validation_error_handler",
]

MAX_STOP_SEQUENCES = 4


class ChatRequest(Protocol):
    """The chat-completions fields the shared checks read."""

    n: int | None
    max_tokens: int | None
    max_completion_tokens: int | None
    stream: bool | None
    tools: list[Any] | None
    logprobs: bool | None
    response_format: dict[str, Any] | None


class CheckedBody(BaseModel):
    """A request body model whose raw JSON is checked first, as the proxy checks its bodies:
    nesting deeper than any request needs, or text that is not Unicode (a lone surrogate), is a
    400 naming the field before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        check_json_value(data)  # raises APIError, which the servers' handler answers
        return data


# ------------------------------------------------------------------------------- keys, 400s


def v1_key_headers(path: str) -> list[KeyHeader]:
    """The key guards every ``/v1`` route, sent as ``Authorization: Bearer <key>``."""
    return [BEARER] if path.startswith("/v1") else []


# Validation errors answered by naming the parameter: pydantic's type -> (message, code).
_NAMED_ERRORS = {
    "missing": ("Missing required parameter", "missing_required_parameter"),
    "extra_forbidden": ("Unrecognized request argument", "unknown_parameter"),
}


def validation_error_handler(
    invalid_body: str, *, reasons: Mapping[str, str] | None = None
) -> Callable[[Request, Exception], Awaitable[Response]]:
    """A handler answering FastAPI's validation errors with OpenAI's 400s, the first error named.

    ``invalid_body`` is the message when the body is no JSON object at all; ``reasons`` replaces
    pydantic's reason for the parameters it names.
    """
    hints = dict(reasons or {})

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        first: dict[str, Any] = dict(errors[0]) if errors else {}
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            return error_response(
                400,
                f"the request body is not valid JSON ({reason}); send one JSON object",
                code="invalid_json",
            )
        where = [part for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = json_path(where)
        if not param:
            return error_response(400, invalid_body, code="invalid_body")
        if first.get("type") in _NAMED_ERRORS:
            what, code = _NAMED_ERRORS[first["type"]]
            return error_response(400, f"{what}: '{param}'.", param=param, code=code)
        reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        reason = hints.get(param, reason)
        return error_response(
            400, f"Invalid value for '{param}': {reason}", param=param, code="invalid_value"
        )

    return on_validation_error


# -------------------------------------------------------------------------------- requests


def stop_sequences(value: Any, max_chars: int | None = None) -> list[str]:
    """``stop`` as a list: None gives none, a string one; ``ValueError`` for anything but
    at most :data:`MAX_STOP_SEQUENCES` non-empty strings (of at most ``max_chars`` each)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not all(
            isinstance(s, str) and s and (max_chars is None or len(s) <= max_chars) for s in stops
        )
        or len(stops) > MAX_STOP_SEQUENCES
    ):
        longest = "" if max_chars is None else f" of at most {max_chars} characters"
        raise ValueError(
            f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} "
            f"non-empty strings{longest}"
        )
    return stops


def stop_validator(max_chars: int | None = None) -> AfterValidator:
    """Annotate a request's ``stop`` field with this to check it by :func:`stop_sequences`."""
    return AfterValidator(lambda value: stop_sequences(value, max_chars))


def _unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def check_supported(request: ChatRequest, *, stream: bool, logprobs: bool = False) -> None:
    """400 for ``tools``, ``logprobs`` (unless ``logprobs``; ``top_logprobs`` above 0 always),
    ``stream`` (unless ``stream``) and a non-text ``response_format``, in that order."""
    for name, given in (("tools", request.tools), ("logprobs", request.logprobs and not logprobs)):
        if given:
            raise _unsupported(f"{name} are not supported by this server", name)
    if getattr(request, "top_logprobs", None):
        raise _unsupported(
            "top_logprobs are not supported by this server; send 0 or leave it out", "top_logprobs"
        )
    if not stream and request.stream:
        raise _unsupported("stream is not supported by this server; send stream: false", "stream")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise _unsupported(
            "only response_format {'type': 'text'} is supported by this server", "response_format"
        )


def choices_wanted(request: ChatRequest, max_n: int) -> int:
    """The request's ``n`` (1 when absent); 400 over ``max_n``."""
    n = 1 if request.n is None else request.n
    if n > max_n:
        raise APIError(
            400,
            f"Invalid value for 'n': this server returns at most {max_n} choices per request; "
            f"got {n}",
            param="n",
            code="invalid_value",
        )
    return n


def max_tokens_wanted(request: ChatRequest, cap: int) -> int:
    """``max_completion_tokens``, else ``max_tokens``, else ``cap``; 400 over ``cap``."""
    param, max_tokens = "max_tokens", request.max_tokens
    if request.max_completion_tokens is not None:
        param, max_tokens = "max_completion_tokens", request.max_completion_tokens
    if max_tokens is None:
        return cap
    if max_tokens > cap:
        raise APIError(
            400,
            f"Invalid value for '{param}': this server generates at most {cap} "
            f"tokens per choice; got {max_tokens}",
            param=param,
            code="invalid_value",
        )
    return max_tokens


def nucleus(top_p: float | None) -> float | None:
    """``top_p`` for sampling: None when absent or 1 (no nucleus cut)."""
    return top_p if top_p is not None and top_p < 1.0 else None


# ------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Sampling:
    """What a validated request asks to generate; each server's plan adds how to answer."""

    chat: list[dict[str, Any]]
    n: int
    greedy: bool
    temperature: float
    top_p: float | None
    max_tokens: int
    seed: int
    stops: list[str]


def prompt_tokens(model: Any, chat: list[dict[str, Any]], max_tokens: int) -> int:
    """The tokens ``chat`` takes in ``model``'s (a ``LocalChatModel``'s) chat template; 400 when
    it cannot be rendered or leaves no room for ``max_tokens`` more."""
    try:
        text = model.render(chat)
    except (TypeError, ValueError, _TemplateError) as exc:
        raise APIError(
            400,
            f"messages cannot be rendered with the model's chat template: {exc}",
            param="messages",
            code="invalid_value",
        ) from exc
    count = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    limit = model.max_positions
    if limit is not None and count + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; the messages take {count} "
            f"and max_tokens asks for {max_tokens} more. Shorten the messages or lower "
            f"max_tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    return count


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` up to its first stop sequence, or None when it holds none.

    Generation does not stop at stop sequences; the reply is cut after the fact.
    """
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else None


# --------------------------------------------------------------------------------- replies


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_json(
    completion_id: str,
    model_name: str,
    choices: Iterable[tuple[str, str]],
    usage: dict[str, int],
    logprobs: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object; ``choices`` are (text, finish reason) pairs, and
    ``logprobs`` each choice's ``{"content": [...]}`` object when the request asked for them."""
    choices = list(choices)
    logprobs = list(logprobs) if logprobs is not None else [None] * len(choices)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs[i],
                "finish_reason": finish,
            }
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": usage,
    }


# ------------------------------------------------------------------------------ streaming


class TokenQueue:
    """A transformers streamer handing each step's token ids to an asyncio queue (``None`` at
    the end); the prompt, which ``generate`` puts first, is skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


T = TypeVar("T")


def start_streaming(generate: Callable[[TokenQueue], T]) -> tuple[TokenQueue, asyncio.Future[T]]:
    """Run ``generate(streamer)`` in a worker thread; the streamer ends however it returns, so
    the stream is never left waiting on a failed generation."""
    streamer = TokenQueue(asyncio.get_running_loop())

    def run() -> T:
        try:
            return generate(streamer)
        finally:
            streamer.end()

    return streamer, asyncio.ensure_future(run_in_threadpool(run))


async def first_step(streamer: TokenQueue, work: asyncio.Future[Any]) -> list[int] | None:
    """The first step's tokens, or ``None`` when the work ended first; the work's error (a bad
    adapter, say) is raised here, before any event is sent, so it is an ordinary error answer."""
    step = asyncio.ensure_future(streamer.queue.get())
    done, _ = await asyncio.wait({step, work}, return_when=asyncio.FIRST_COMPLETED)
    if step in done and step.result() is not None:
        return step.result()
    if step not in done:
        step.cancel()
    await work  # ended before any token: raises the work's error, if it failed
    return None


async def new_text(
    first: list[int] | None, streamer: TokenQueue, tokenizer: Any, stop_ids: Iterable[int]
) -> AsyncIterator[str]:
    """The text each step adds, decoded as it arrives (a character split across tokens waits
    for its last byte); leading whitespace is left out, as the finished reply strips it."""
    stop = set(stop_ids)
    ids: list[int] = []
    sent = ""
    step = first
    while step is not None:
        ids += [t for t in step if t not in stop]
        text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
            yield text[len(sent) :]
            sent = text
        step = await streamer.queue.get()


def chunk_event(
    completion_id: str,
    created: int,
    model_name: str,
    choices: list[dict[str, Any]],
    *,
    usage: Any = None,
    with_usage: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """One ``chat.completion.chunk`` server-sent event."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_name,
        "choices": choices,
        **(extra or {}),
    }
    if with_usage:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
