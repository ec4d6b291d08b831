"""An OpenAI-compatible chat-completions server over a local chat model.

``create_app(LocalChatModel.from_pretrained())`` gives a FastAPI app that speaks enough of
OpenAI's REST API for the ``openai`` SDK and LangChain's ``ChatOpenAI`` to use a local model:

- ``GET /v1/models`` and ``GET /v1/models/{id}``: the one model served;
- ``POST /v1/chat/completions``: ``messages``, ``n``, ``temperature``, ``top_p``,
  ``max_tokens`` / ``max_completion_tokens``, ``seed``, ``stop`` and ``stream`` (with
  ``stream_options.include_usage``);
- ``GET /healthz``.

Every error is OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``,
with a 4xx status for bad input (400 for invalid JSON or values, 401 for a wrong key, 404 for
an unknown route, 413 for an oversized body), never a 500.

Sampling: ``temperature=0`` decodes greedily (and repeats that answer for ``n > 1``), and so
does a request for one choice that sets neither ``temperature`` nor ``top_p``. Otherwise each
choice is sampled with its own generator derived from ``seed`` (a random one when absent), so
the same request with the same ``seed`` returns the same choices. ``stop`` cuts the finished
reply at the first stop sequence; generation itself does not stop there.

Streaming: a request for one choice without ``stop`` sequences streams its tokens as they are
generated (``chat.completion.chunk`` events, the first as soon as the first token is drawn);
with ``n > 1`` or ``stop`` the whole reply is generated first (a stop sequence is only known to
have ended the reply once it is complete) and then sent as chunks.

Generation runs in a worker thread, never on the event loop, and one at a time per model. The request's ``model`` is accepted
whatever it names (this is a drop-in local endpoint) and the response names the served model.
``logprobs: true`` returns each choice's token log-probabilities in OpenAI's schema
(``choices[i].logprobs.content``: ``token``, ``logprob``, ``bytes``, and an empty
``top_logprobs``; streamed whole with the choice's last chunk). Options this server cannot honour
and that would change the reply's shape (``tools``, ``top_logprobs`` above 0, a non-text
``response_format``) are refused with a 400; other OpenAI options (penalties, ``logit_bias``,
``user``, ...) are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from starlette.concurrency import run_in_threadpool

from capplug.llms import Candidate, LocalChatModel, SamplingRecipe, SamplingStrategy
from capplug.models import DEFAULT_CHAT_MODEL
from capplug.serve import _chat
from capplug.serve._http import (
    APIError,
    BodyLimit,
    RequireKey,
    SafePath,
    check_positive_int,
    install_error_handlers,
)

__all__ = ["create_app"]

# One generation at a time per model, even across several apps: LocalChatModel swaps its
# generation config during sampling, and two CPU generations at once only thrash the cores.
_model_locks: weakref.WeakKeyDictionary[LocalChatModel, threading.Lock] = (
    weakref.WeakKeyDictionary()
)
_model_locks_guard = threading.Lock()


# ------------------------------------------------------------------------------- requests


class _Message(BaseModel):
    """One chat turn; extra fields (``name``, ``tool_calls``, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            for part in value:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        "only text content parts ({'type': 'text', 'text': ...}) are supported"
                    )
            return value
        raise ValueError("content must be a string or a list of text parts")

    def turn(self) -> dict[str, Any]:
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = None


class _ChatCompletionRequest(_chat.CheckedBody):
    """The fields of OpenAI's chat-completions request this server reads."""

    model_config = ConfigDict(extra="ignore")

    messages: list[_Message] = Field(min_length=1)
    model: str | None = None
    n: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    seed: StrictInt | None = None
    stop: Annotated[Any, _chat.stop_validator()] = Field(default=None, validate_default=True)
    stream: StrictBool | None = None
    stream_options: _StreamOptions | None = None
    tools: list[Any] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


# --------------------------------------------------------------------------------- errors


_on_validation_error = _chat.validation_error_handler(
    "the request body must be a JSON object with 'messages' (and Content-Type: application/json)",
    reasons={"messages": "give a non-empty list of {'role': ..., 'content': ...} objects"},
)


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class _Plan(_chat.Sampling):
    """A validated request: what to generate and how to answer."""

    stream: bool
    include_usage: bool
    logprobs: bool = False


def _plan(request: _ChatCompletionRequest, *, max_n: int, max_tokens_cap: int) -> _Plan:
    _chat.check_supported(request, stream=True, logprobs=True)
    n = _chat.choices_wanted(request, max_n)
    max_tokens = _chat.max_tokens_wanted(request, max_tokens_cap)
    sampling_asked = request.temperature is not None or request.top_p is not None
    greedy = request.temperature == 0 or (not sampling_asked and n == 1)
    return _Plan(
        chat=[message.turn() for message in request.messages],
        n=n,
        greedy=greedy,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=_chat.nucleus(request.top_p),
        max_tokens=max_tokens,
        seed=secrets.randbelow(2**31) if request.seed is None else request.seed,
        stops=request.stop,
        stream=bool(request.stream),
        include_usage=bool(
            request.stream and request.stream_options and request.stream_options.include_usage
        ),
        logprobs=bool(request.logprobs),
    )


def _model_lock(model: LocalChatModel) -> threading.Lock:
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.Lock()
        return lock


def _candidates(model: LocalChatModel, plan: _Plan, streamer: Any = None) -> list[Candidate]:
    """The request's ``n`` candidates, one generation at a time per model."""
    if plan.greedy:
        strategy = SamplingStrategy(method="greedy")
    else:
        strategy = SamplingStrategy(n=plan.n, temperature=plan.temperature, top_p=plan.top_p)
    recipe = SamplingRecipe(strategies=(strategy,), max_new_tokens=plan.max_tokens)
    with _model_lock(model):
        (drawn,) = model.sample_candidates(
            [plan.chat], recipe=recipe, seed=plan.seed, progress=False, streamer=streamer
        )
    # Greedy decoding gives one answer however often it is asked; copy it to every choice.
    return drawn * plan.n if plan.greedy else drawn


@dataclass(frozen=True)
class _Choice:
    text: str
    finish_reason: Literal["stop", "length"]
    tokens: int
    logprobs: dict[str, Any] | None = None


def _choice(
    model: LocalChatModel, candidate: Candidate, stops: list[str], *, logprobs: bool
) -> _Choice:
    text = _chat.cut_at_stop(candidate.text, stops)
    if text is not None:
        tokens = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        finish: Literal["stop", "length"] = "stop"
    else:
        text, tokens = candidate.text, candidate.n_tokens
        finish = "stop" if candidate.finished else "length"
    content = _token_logprobs(model, candidate, text) if logprobs else None
    return _Choice(text, finish, tokens, None if content is None else {"content": content})


def _token_logprobs(model: LocalChatModel, candidate: Candidate, text: str) -> list[dict[str, Any]]:
    """OpenAI's per-token ``logprobs.content`` for the tokens that make up ``text``.

    The end-of-turn token is left out (OpenAI reports content tokens only), and so are tokens
    past a stop sequence that cut the reply.
    """
    out: list[dict[str, Any]] = []
    ids: list[int] = []
    for token, value in zip(candidate.token_ids, candidate.token_logprobs, strict=False):
        if token in model.eos_token_ids:
            break
        ids.append(token)
        if len(model.tokenizer.decode(ids, skip_special_tokens=True).strip()) > len(text):
            break
        piece = model.tokenizer.decode([token])
        out.append(
            {
                "token": piece,
                "logprob": value,
                "bytes": list(piece.encode("utf-8")),
                "top_logprobs": [],
            }
        )
    return out


def _answer(model: LocalChatModel, plan: _Plan, streamer: Any = None) -> tuple[int, list[_Choice]]:
    """Prompt tokens and choices for a request; tokenizes and generates, so run it in a thread."""
    prompt = _chat.prompt_tokens(model, plan.chat, plan.max_tokens)
    choices = [
        _choice(model, candidate, plan.stops, logprobs=plan.logprobs)
        for candidate in _candidates(model, plan, streamer)
    ]
    return prompt, choices


# -------------------------------------------------------------------------------- replies


def _usage(prompt_tokens: int, choices: Sequence[_Choice]) -> dict[str, int]:
    return _chat.usage_json(prompt_tokens, sum(c.tokens for c in choices))


def _completion(
    completion_id: str, model_name: str, choices: Sequence[_Choice], usage: dict[str, int]
) -> dict[str, Any]:
    pairs = [(choice.text, choice.finish_reason) for choice in choices]
    return _chat.completion_json(
        completion_id, model_name, pairs, usage, [choice.logprobs for choice in choices]
    )


def _events(
    completion_id: str,
    model_name: str,
    choices: Sequence[_Choice],
    usage: dict[str, int],
    *,
    include_usage: bool,
) -> Iterator[str]:
    """Server-sent ``chat.completion.chunk`` events for finished choices, then ``[DONE]``.

    The whole reply is generated before the first event, so a stream carries no speed-up over
    a plain request; it exists for clients that always stream. Each choice streams as its role,
    its text in word-sized pieces, then its finish reason; with ``include_usage`` a last chunk
    with no choices carries the usage (and every other chunk ``"usage": null``), as OpenAI does.
    """
    created = int(time.time())

    def event(chunk_choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> str:
        chunk: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": chunk_choices,
        }
        if include_usage:
            chunk["usage"] = usage_
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(
        index: int,
        content: dict[str, str],
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish}

    for i, choice in enumerate(choices):
        yield event([delta(i, {"role": "assistant", "content": ""})])
        for piece in re.findall(r"\s*\S+|\s+$", choice.text):
            yield event([delta(i, {"content": piece})])
        # The choice's token log-probabilities arrive whole, with its finish reason.
        yield event([delta(i, {}, choice.finish_reason, choice.logprobs)])
    if include_usage:
        yield event([], usage)
    yield "data: [DONE]\n\n"


async def _live_events(
    model: LocalChatModel,
    plan: _Plan,
    completion_id: str,
    model_name: str,
    streamer: _chat.TokenQueue,
    work: asyncio.Future[tuple[int, list[_Choice]]],
    first: list[int] | None,
) -> AsyncIterator[str]:
    """One choice's events as its tokens are drawn, then its finish, usage and ``[DONE]``."""
    created = int(time.time())

    def event(choices: list[dict[str, Any]], usage: Any = None) -> str:
        return _chat.chunk_event(
            completion_id, created, model_name, choices, usage=usage, with_usage=plan.include_usage
        )

    def delta(content: dict[str, str], finish: str | None = None, logprobs: Any = None) -> dict:
        return {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish}

    yield event([delta({"role": "assistant", "content": ""})])
    sent = ""
    async for piece in _chat.new_text(first, streamer, model.tokenizer, model.eos_token_ids):
        yield event([delta({"content": piece})])
        sent += piece
    prompt_tokens, (choice,) = await work
    if choice.text.startswith(sent) and len(choice.text) > len(sent):
        yield event([delta({"content": choice.text[len(sent) :]})])
    yield event([delta({}, choice.finish_reason, choice.logprobs)])
    if plan.include_usage:
        yield event([], _usage(prompt_tokens, [choice]))
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------ app


def create_app(
    model: LocalChatModel,
    *,
    model_name: str = DEFAULT_CHAT_MODEL,
    max_body_bytes: int = 1 << 20,
    max_n: int = 16,
    max_tokens_cap: int = 512,
    api_key: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible chat-completions app over ``model``; see the module docstring.

    Args:
        model: the local chat model that answers.
        model_name: the id ``/v1/models`` lists and every response names.
        max_body_bytes: larger request bodies get a 413.
        max_n: the most choices (``n``) one request may ask for.
        max_tokens_cap: the most tokens one choice may have; also the default ``max_tokens``.
        api_key: when set, every ``/v1`` route asks for ``Authorization: Bearer <api_key>``.
    """
    if not isinstance(model, LocalChatModel):
        raise TypeError(f"model must be a LocalChatModel; got {type(model).__name__}")
    for value, argument in (
        (max_body_bytes, "max_body_bytes"),
        (max_n, "max_n"),
        (max_tokens_cap, "max_tokens_cap"),
    ):
        check_positive_int(value, argument)
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string; got {model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string, or None for no key")

    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "capplug"}
    app = FastAPI(
        title="capplug local OpenAI-compatible server",
        summary=f"Chat completions from {model_name}, a local model.",
    )
    install_error_handlers(app)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(SafePath)  # innermost: no route sees a path out of its base
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        # Added last so it runs first: an unauthenticated request learns nothing else.
        app.add_middleware(RequireKey, api_key=api_key, headers_for=_chat.v1_key_headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )
        return card

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: _ChatCompletionRequest) -> Response:
        plan = _plan(body, max_n=max_n, max_tokens_cap=max_tokens_cap)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if plan.stream and plan.n == 1 and not plan.stops:
            streamer, work = _chat.start_streaming(lambda queue: _answer(model, plan, queue))
            first = await _chat.first_step(streamer, work)  # errors before any event is sent
            return StreamingResponse(
                _live_events(model, plan, completion_id, model_name, streamer, work, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        prompt_tokens, choices = await run_in_threadpool(_answer, model, plan)
        usage = _usage(prompt_tokens, choices)
        if plan.stream:
            return StreamingResponse(
                _events(
                    completion_id, model_name, choices, usage, include_usage=plan.include_usage
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(_completion(completion_id, model_name, choices, usage))

    return app
