"""A stream of one candidate: the upstream's own stream passed through as it arrives, the
``capplug`` metadata in its last chunk (a scripted upstream on httpx2's MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from fake_upstream import (
    CHAT,
    MESSAGES,
    Sleeps,
    Upstream,
    completion,
    fast_retry,
    metric,
    post,
    proxy,
)

from capplug.selection import METADATA_KEYS

PROXY_OWN = {"returned", "upstream_seconds", "scoring_seconds"}
STREAM = {**CHAT, "stream": True}
USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def upstream_events(texts: list[str], *, usage: bool = False, done: bool = True) -> list[bytes]:
    """An OpenAI chat-completion stream of ``texts``: role, one chunk a text, finish reason, the
    usage chunk (``usage``), ``[DONE]`` (``done``)."""
    head = {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m-2024",
        "system_fingerprint": "fp_up",
    }

    def event(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ]  # fmt: skip
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n".encode()

    out = [event({"role": "assistant", "content": ""})]
    out += [event({"content": text}) for text in texts]
    out.append(event({}, "stop"))
    if usage:
        out.append(event(None, usage=USAGE))
    return out + ([b"data: [DONE]\n\n"] if done else [])


class Trickle(httpx2.AsyncByteStream):
    """An upstream body sent event by event; the events from ``hold_at`` on wait for ``gate``.
    Records how many it has sent and whether it was closed."""

    def __init__(
        self, events: list[bytes], gate: asyncio.Event | None = None, hold_at: int = 0
    ) -> None:
        self.events = events
        self.gate = gate
        self.hold_at = hold_at
        self.sent = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, event in enumerate(self.events):
            if self.gate is not None and i == self.hold_at:
                await self.gate.wait()
            self.sent += 1
            yield event

    async def aclose(self) -> None:
        self.closed = True


def streaming(body: Trickle) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=body)


def events_of(text: str) -> list[Any]:
    """The data of each server-sent event: JSON, or ``"[DONE]"``."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    data = [b.removeprefix("data: ") for b in blocks]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def content_of(chunks: list[Any]) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if isinstance(c, dict) and c.get("choices") and c["choices"][0]["delta"].get("content")
    ]


async def drive(
    app: Any, body: dict[str, Any], on_body: Any, gone: asyncio.Event
) -> list[dict[str, Any]]:
    """One request straight through the ASGI app: ``on_body(bytes)`` sees each body message as
    it is sent; the client disconnects when ``gone`` is set. Returns the messages sent."""
    raw = json.dumps(body).encode()
    messages = iter([{"type": "http.request", "body": raw, "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        message = next(messages, None)
        if message is not None:
            return message
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            on_body(message["body"])

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
        "server": ("proxy.test", 80),
        "headers": [
            (b"host", b"proxy.test"), (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def test_the_first_token_reaches_the_client_before_the_upstream_has_finished() -> None:
    texts = ["Paris", " is", " the capital."]
    gate = asyncio.Event()
    # Role and first token go out; the rest waits until the client has seen the first token.
    trickle = Trickle(upstream_events(texts), gate, hold_at=2)
    upstream = Upstream(lambda r: streaming(trickle))
    client = proxy(upstream, n=1)
    seen_when_first_arrived: list[int] = []

    def on_body(chunk: bytes) -> None:
        if b'"Paris"' in chunk:
            seen_when_first_arrived.append(trickle.sent)
            gate.set()

    options = {"include_usage": False}
    sent = asyncio.run(
        drive(client.app, {**STREAM, "stream_options": options}, on_body, asyncio.Event())
    )

    assert seen_when_first_arrived == [2]  # the upstream had sent the role and one token only
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert start["status"] == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert headers["x-capplug-candidates"] == "1" and "upstream;dur=" in headers["server-timing"]
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(bodies) >= len(texts) + 2  # event by event, not gathered up
    chunks = events_of(b"".join(bodies).decode())
    # The upstream's chunks as it sent them, then the metadata chunk, then [DONE].
    assert chunks[: len(texts) + 2] == events_of(b"".join(upstream_events(texts)).decode())[:-1]
    *_, last, done = chunks
    assert done == "[DONE]" and content_of(chunks) == texts
    assert last["choices"] == [] and last["id"] == "chatcmpl-up" and last["model"] == "m-2024"
    assert last["created"] == 1700000000 and last["object"] == "chat.completion.chunk"
    meta = last["capplug"]
    assert set(meta) == set(METADATA_KEYS) | PROXY_OWN
    assert meta["n_requested"] == 1 and meta["n_received"] == 1 and meta["upstream_calls"] == 1
    assert meta["native_n"] is False and meta["failures"] == 0 and meta["errors"] == []
    assert meta["candidates"] == ["".join(texts)] and meta["chosen"] == 0
    assert meta["returned"] == [0] and meta["scores"] is None and "streamed" in meta["reason"]
    # One upstream request, asked to stream as the client asked, with nothing added.
    (asked,) = upstream.bodies()
    assert asked == {**STREAM, "stream_options": options}
    assert trickle.closed


def test_the_usage_chunk_carries_the_metadata_and_a_stream_without_done_still_ends() -> None:
    upstream = Upstream(lambda r: streaming(Trickle(upstream_events(["Paris"], usage=True))))
    with proxy(upstream, n=1) as client:
        body = {**STREAM, "stream_options": {"include_usage": True}}
        chunks = events_of(post(client, body).text)
    *_, last, done = chunks
    assert done == "[DONE]" and last["usage"] == USAGE and last["capplug"]["n_received"] == 1
    assert sum(1 for c in chunks if isinstance(c, dict) and "usage" in c) == 1  # not twice

    cut_short = b"".join(upstream_events(["Paris"], done=False)).removesuffix(b"\n\n")
    sse = {
        "content-type": "text/event-stream"
    }  # a body handed over whole, no blank line at its end
    cut = Upstream(lambda r: httpx2.Response(200, headers=sse, content=cut_short))
    with proxy(cut, n=1) as client:
        chunks = events_of(post(client, STREAM).text)
    assert chunks[-1] == "[DONE]" and set(chunks[-2]["capplug"]) >= set(METADATA_KEYS)
    assert content_of(chunks) == ["Paris"]


def test_a_client_that_leaves_mid_stream_closes_the_upstream() -> None:
    gate = asyncio.Event()  # never set: the upstream stalls after the first token
    trickle = Trickle(upstream_events(["Paris", " is"]), gate, hold_at=2)
    client = proxy(Upstream(lambda r: streaming(trickle)), n=1)
    gone = asyncio.Event()

    def on_body(chunk: bytes) -> None:
        if b'"Paris"' in chunk:
            gone.set()

    asyncio.run(drive(client.app, STREAM, on_body, gone))
    assert trickle.closed and trickle.sent == 2


def test_failures_before_the_first_byte_are_retried_or_relayed_as_without_stream(
    sleeps: Sleeps,
) -> None:
    answers = iter([httpx2.Response(500, json={"error": {"message": "boom"}})])

    def flaky(request: httpx2.Request) -> httpx2.Response:
        failing = next(answers, None)
        return failing if failing is not None else streaming(Trickle(upstream_events(["Paris"])))

    upstream = Upstream(flaky)
    with proxy(upstream, n=1, retry=fast_retry(sleeps)) as client:
        chunks = events_of(post(client, STREAM).text)
        assert metric(client, "capplug_proxy_upstream_requests_total", mode="rerank") == 2
        assert metric(client, "capplug_proxy_upstream_retries_total", reason="500") == 1
    assert content_of(chunks) == ["Paris"] and chunks[-1] == "[DONE]"
    assert len(upstream.requests) == 2 and len(sleeps.waits) == 1

    refusal = {"error": {"message": "no such model", "type": "invalid_request_error",
                         "param": "model", "code": "model_not_found"}}  # fmt: skip
    refusing = Upstream(lambda r: httpx2.Response(400, json=refusal))
    with proxy(refusing, n=1, retry=fast_retry(sleeps)) as client:
        streamed, plain = post(client, STREAM), post(client, CHAT)
    assert streamed.status_code == plain.status_code == 400
    assert streamed.json() == plain.json() == refusal
    assert len(refusing.requests) == 2  # one call each: not retried

    lasting = Upstream(lambda r: httpx2.Response(503, json={"error": {"message": "down"}}))
    with proxy(lasting, n=1, retry=fast_retry(Sleeps(), attempts=3)) as client:
        streamed, plain = post(client, STREAM), post(client, CHAT)
    assert streamed.status_code == plain.status_code == 502
    assert streamed.json() == plain.json()  # "failed after 3 attempts", as without stream
    assert streamed.headers["x-should-retry"] == "false"
    assert len(lasting.requests) == 6


def test_an_upstream_that_ignores_stream_is_streamed_whole() -> None:
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Paris"])))
    with proxy(upstream, n=1) as client:
        chunks = events_of(post(client, STREAM).text)
    assert content_of(chunks) == ["Paris"] and chunks[-1] == "[DONE]"
    assert chunks[0]["capplug"]["n_received"] == 1


def test_a_stream_broken_off_midway_ends_with_an_error_event() -> None:
    class Broken(Trickle):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield self.events[0]
            raise httpx2.ReadError("connection reset")

    upstream = Upstream(lambda r: streaming(Broken(upstream_events(["Paris"]))))
    with proxy(upstream, n=1) as client:
        chunks = events_of(post(client, STREAM).text)
        assert metric(client, "capplug_proxy_upstream_failures_total", reason="connection") == 1
    assert len(chunks) == 2 and "[DONE]" not in chunks
    assert chunks[-1]["error"]["code"] == "upstream_error"
    assert "broke off its stream" in chunks[-1]["error"]["message"]


def test_the_openai_sdk_reads_a_stream_of_one() -> None:
    texts = ["Paris", " is", " the capital", " of France."]
    upstream = Upstream(lambda r: streaming(Trickle(upstream_events(texts, usage=True))))
    with proxy(upstream, n=1) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="sk-client", http_client=http, max_retries=0
        )
        stream = client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(texts)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13
    assert chunks[-1].capplug["n_requested"] == 1  # the extra field, as the SDK keeps it


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()
