"""Upstream replies and the answers built from them: candidate texts, usage, errors, stream chunks,
and an upstream's own stream relayed."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

from capplug.llms.retry import (
    UpstreamHTTPError,
    retry_after_seconds,
)


def message_of(choice: Mapping[str, Any]) -> Mapping[str, Any]:
    message = choice.get("message")
    return message if isinstance(message, Mapping) else {}


def has_tool_calls(choice: Mapping[str, Any]) -> bool:
    message = message_of(choice)
    return bool(message.get("tool_calls") or message.get("function_call"))


def candidate_text(choice: Mapping[str, Any]) -> str:
    """What the scorer reads for a candidate: its text content (or its refusal)."""
    message = message_of(choice)
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    refusal = message.get("refusal")
    return refusal if isinstance(refusal, str) else ""


def _add_usage(total: dict[str, Any], part: Mapping[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, bool):
            total.setdefault(key, value)
        elif isinstance(value, int | float):
            current = total.get(key)
            total[key] = (current if isinstance(current, int | float) else 0) + value
        elif isinstance(value, Mapping):
            nested = total.get(key)
            if not isinstance(nested, dict):
                nested = total[key] = {}
            _add_usage(nested, value)
        else:
            total.setdefault(key, value)


def summed_usage(replies: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``usage`` of every reply added up, nested details included; ``None`` if none had one."""
    usages = [r["usage"] for r in replies if isinstance(r.get("usage"), Mapping)]
    if not usages:
        return None
    total: dict[str, Any] = {}
    for usage in usages:
        _add_usage(total, usage)
    return total


@dataclass
class Replies:
    """The upstream replies behind one request's candidates (for usage, rate-limit headers and
    the completion's own fields)."""

    replies: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def add(self, reply: dict[str, Any], headers: httpx2.Headers) -> None:
        self.replies.append(reply)
        # Rate-limit headers describe the latest state of the caller's quota: keep the latest.
        self.headers.update(
            {k: v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}
        )


class RetryAfter(Exception):
    """Carries a response's headers to :func:`retry_after_seconds`, which reads ``.headers``."""

    def __init__(self, headers: httpx2.Headers) -> None:
        super().__init__()
        self.headers = headers


def status_error(response: httpx2.Response) -> UpstreamHTTPError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = None
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        message = body["error"].get("message")
    if not isinstance(message, str) or not message:
        text = body if isinstance(body, str) else json.dumps(body)
        message = " ".join(text.split())[:300] or response.reason_phrase or "no message"
    return UpstreamHTTPError(
        response.status_code,
        message,
        retry_after=retry_after_seconds(RetryAfter(response.headers)),
        body=body,
    )


def json_body(response: httpx2.Response) -> tuple[Any, str]:
    """A successful answer's JSON and the start of its text (for errors); raises for an error
    status or a body that is not JSON."""
    if response.status_code >= 400:
        raise status_error(response)
    snippet = " ".join(response.text[:200].split())
    try:
        return response.json(), snippet
    except ValueError:
        raise UpstreamHTTPError(
            0,
            f"upstream answered {response.status_code} with a body that is not JSON: {snippet!r}",
        ) from None


def chat_completion(response: httpx2.Response) -> dict[str, Any]:
    """The body of a successful chat-completions answer; raises for anything else."""
    body, snippet = json_body(response)
    choices = body.get("choices") if isinstance(body, dict) else None
    if (
        not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)
    ):
        raise UpstreamHTTPError(
            0,
            f"upstream answered {response.status_code} with JSON that is not a chat completion "
            f"(no choices with a message): {snippet!r}",
        )
    return body


def single_request(payload: dict[str, Any], k: int) -> dict[str, Any]:
    """The ``k``-th single request standing in for ``n``: a request's seed becomes seed + k, so
    the candidates differ from one another and the same request still draws the same ones."""
    seed = payload.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return {**payload, "seed": seed + k}
    return payload


def completion_chunks(
    reply: Mapping[str, Any],
    choices: Sequence[Mapping[str, Any]],
    usage: dict[str, Any] | None,
    meta: dict[str, Any],
    *,
    include_usage: bool,
) -> Iterator[str]:
    """Server-sent ``chat.completion.chunk`` events for whole ``choices``, then ``[DONE]``."""
    head = {
        "id": reply.get("id"),
        "object": "chat.completion.chunk",
        "created": reply.get("created", int(time.time())),
        "model": reply.get("model"),
    }
    for key in ("system_fingerprint", "service_tier"):
        if key in reply:
            head[key] = reply[key]

    def event(chunk_choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {**head, "choices": chunk_choices, **extra}
        if include_usage:
            chunk.setdefault("usage", None)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(index: int, content: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": None, **extra}

    for index, choice in enumerate(choices):
        message = message_of(choice)
        first = delta(index, {"role": message.get("role") or "assistant", "content": ""})
        yield event([first], capplug=meta) if index == 0 else event([first])
        content = message.get("content")
        if isinstance(content, str) and content:
            yield event([delta(index, {"content": content}, logprobs=choice.get("logprobs"))])
        if message.get("refusal"):
            yield event([delta(index, {"refusal": message["refusal"]})])
        if message.get("tool_calls"):
            calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
            yield event([delta(index, {"tool_calls": calls})])
        if message.get("function_call"):
            yield event([delta(index, {"function_call": message["function_call"]})])
        finish = choice.get("finish_reason") or "stop"
        yield event([delta(index, {}, finish_reason=finish)])
    if include_usage:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


def is_event_stream(response: httpx2.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class StreamRelay:
    """An upstream's ``chat.completion.chunk`` stream relayed event by event as it arrives,
    noting what the closing metadata chunk needs: the chunks' common fields and the first
    choice's text."""

    def __init__(self, model: Any) -> None:
        self.head: dict[str, Any] = {
            "id": None,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.parts: list[str] = []
        self.done = False  # the upstream sent its [DONE]
        self._held: dict[str, Any] | None = None  # the usage chunk, which the metadata joins

    @property
    def text(self) -> str:
        return "".join(self.parts)

    async def events(self, lines: AsyncIterable[str]) -> AsyncIterator[str]:
        """Each upstream event once its blank line arrives, up to its ``[DONE]`` (or its end),
        which :meth:`closing` sends; the usage chunk is held back for it to carry."""
        event: list[str] = []
        async for line in lines:
            if line:
                event.append(line)
                continue
            for out in self._relayed(event):
                yield out
            event = []
            if self.done:
                return
        for out in self._relayed(event):  # an event the stream ended without a blank line after
            yield out

    def _relayed(self, event: list[str]) -> Iterator[str]:
        if not event:
            return
        data = "\n".join(line[5:].removeprefix(" ") for line in event if line.startswith("data:"))
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data) if data else None
        except ValueError:
            chunk = None  # not ours to judge: relayed as it came
        if self._held is not None:
            yield sse(self._held)  # not the last chunk after all
            self._held = None
        if isinstance(chunk, dict):
            self.head.update({k: chunk[k] for k in _HEAD_KEYS if k in chunk})
            if chunk.get("choices") == [] and isinstance(chunk.get("usage"), Mapping):
                self._held = chunk
                return
            self._note_text(chunk)
        yield "\n".join(event) + "\n\n"

    def _note_text(self, chunk: Mapping[str, Any]) -> None:
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, Mapping) else None
            if isinstance(content, str):
                self.parts.append(content)

    def closing(self, meta: dict[str, Any]) -> str:
        """The last chunk, carrying ``capplug`` (the upstream's usage chunk where it sent one,
        else one with no choices), then ``[DONE]``."""
        chunk = self._held if self._held is not None else {**self.head, "choices": []}
        return sse({**chunk, "capplug": meta}) + "data: [DONE]\n\n"


_HEAD_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")
