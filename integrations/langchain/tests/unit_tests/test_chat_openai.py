"""CappyBestOfN around the real ChatOpenAI, over a mock HTTP transport with injected faults.

These count upstream requests, so they show how many attempts each failure costs.
"""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
from langchain_core.callbacks import get_usage_metadata_callback
from langchain_openai import ChatOpenAI

from capplug.llms.retry import RetryPolicy
from langchain_capplug import CappyBestOfN

from .fakes import KeywordScorer

REPLIES = ["Lyon.", "Paris.", "London.", "Marseille."]


class Upstream:
    """An OpenAI-compatible upstream: scripted faults first, then completions."""

    def __init__(self, *faults, honour_n: bool = True) -> None:
        self.faults = list(faults)
        self.honour_n = honour_n
        self.bodies: list[dict] = []
        self.served = 0

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, Exception):
                raise fault
            return fault
        n = body.get("n") or 1 if self.honour_n else 1
        choices = []
        for i in range(n):
            text = REPLIES[self.served % len(REPLIES)]
            self.served += 1
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            )
        return httpx2.Response(
            200,
            json={
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
            },
        )

    def chat_model(self, **settings) -> ChatOpenAI:
        async def async_handle(request: httpx2.Request) -> httpx2.Response:
            return self.handle(request)

        return ChatOpenAI(
            model="upstream-model",
            base_url="http://upstream.test/v1",
            api_key="sk-secret",
            temperature=0,
            max_retries=3,  # the SDK's own retries: CappyBestOfN must turn them off
            http_client=httpx2.Client(transport=httpx2.MockTransport(self.handle)),
            http_async_client=httpx2.AsyncClient(transport=httpx2.MockTransport(async_handle)),
            http_socket_options=(),  # no socket-option probe: unit tests run with sockets off
            **settings,
        )


def error(status: int, **headers: str) -> httpx2.Response:
    return httpx2.Response(
        status, headers=headers, json={"error": {"message": f"status {status}", "type": "x"}}
    )


def best_of(upstream: Upstream, n: int = 3, **settings) -> tuple[CappyBestOfN, list[float]]:
    sleeps: list[float] = []

    async def async_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    retry = RetryPolicy(
        max_attempts=3,
        initial_backoff=0.1,
        jitter=0.0,
        sleep=sleeps.append,
        async_sleep=async_sleep,
    )
    model = CappyBestOfN(
        llm=upstream.chat_model(), scorer=KeywordScorer(), n=n, retry=retry, **settings
    )
    return model, sleeps


def test_native_n_is_one_request_with_a_sampling_temperature():
    upstream = Upstream()
    best, _ = best_of(upstream, n=3)
    reply = best.invoke("Capital of France?")
    assert reply.content == "Paris."
    assert len(upstream.bodies) == 1
    assert upstream.bodies[0]["n"] == 3 and upstream.bodies[0]["temperature"] == 0.8
    assert reply.response_metadata["capplug"]["n_received"] == 3


def test_an_upstream_that_ignores_n_is_topped_up_by_fan_out():
    upstream = Upstream(honour_n=False)
    best, _ = best_of(upstream, n=3)
    reply = best.invoke("Capital of France?")
    assert len(upstream.bodies) == 3  # one native call returning one choice, then two more
    assert reply.response_metadata["capplug"]["n_received"] == 3
    assert reply.content == "Paris."


def test_rate_limit_honours_retry_after_and_attempts_do_not_multiply():
    upstream = Upstream(error(429, **{"retry-after": "2"}))
    best, sleeps = best_of(upstream, n=3)
    reply = best.invoke("Capital of France?")
    assert reply.content == "Paris."
    assert len(upstream.bodies) == 2 and sleeps == [2.0]


def test_persistent_server_errors_cost_exactly_the_policys_attempts():
    upstream = Upstream(*[error(500)] * 10)
    best, sleeps = best_of(upstream, n=3)
    with pytest.raises(Exception, match="500"):
        best.invoke("Capital of France?")
    assert len(upstream.bodies) == 3  # not 3 policy attempts x 4 SDK attempts
    assert sleeps == pytest.approx([0.1, 0.2])


def test_timeouts_are_retried():
    upstream = Upstream(httpx2.ReadTimeout("timed out"))
    best, sleeps = best_of(upstream, n=2)
    assert best.invoke("Capital of France?").content == "Paris."
    assert len(upstream.bodies) == 2 and len(sleeps) == 1


def test_malformed_bodies_are_not_retried():
    garbage = httpx2.Response(200, headers={"content-type": "application/json"}, content=b"{nope")
    upstream = Upstream(*[garbage] * 10)
    best, sleeps = best_of(upstream, n=2)
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own decoding error
        best.invoke("Capital of France?")
    assert len(upstream.bodies) == 1  # a malformed body repeats: neither retried nor fanned out
    assert sleeps == []


def test_candidates_lost_after_retries_are_counted_when_enough_arrive():
    upstream = Upstream(honour_n=False)
    upstream.faults = [httpx2.Response(200, json={"choices": []})]  # placeholder, replaced below
    upstream.faults = []
    best, _ = best_of(upstream, n=3, max_concurrency=1)
    # The native call answers one choice; of the two fan-out calls one is refused outright.
    calls = {"count": 0}
    original = upstream.handle

    def handle(request: httpx2.Request) -> httpx2.Response:
        calls["count"] += 1
        if calls["count"] == 2:
            upstream.bodies.append(json.loads(request.content))
            return error(400)
        return original(request)

    upstream.handle = handle
    best = CappyBestOfN(
        llm=upstream.chat_model(),
        scorer=KeywordScorer(),
        n=3,
        max_concurrency=1,
        retry=best.retry,
    )
    reply = best.invoke("Capital of France?")
    meta = reply.response_metadata["capplug"]
    assert meta["n_received"] == 2 and meta["failures"] == 1 and len(upstream.bodies) == 3


def test_async_native_n():
    upstream = Upstream(error(503))
    best, sleeps = best_of(upstream, n=4)
    reply = asyncio.run(best.ainvoke("Capital of France?"))
    assert reply.content == "Paris."
    assert len(upstream.bodies) == 2 and upstream.bodies[-1]["n"] == 4 and sleeps == [0.1]


def test_the_users_model_keeps_its_own_settings():
    upstream = Upstream()
    model = upstream.chat_model()
    CappyBestOfN(llm=model, scorer=KeywordScorer(), n=2).invoke("Capital of France?")
    assert model.max_retries == 3 and model.temperature == 0


def test_the_reply_names_its_model_and_carries_the_requests_usage():
    upstream = Upstream()
    best, _ = best_of(upstream, n=3)
    with get_usage_metadata_callback() as usage:
        reply = best.invoke("Capital of France?")
    assert reply.response_metadata["model_name"] == "upstream-model"
    assert reply.usage_metadata["output_tokens"] == 3  # the one request's three choices
    assert usage.usage_metadata["upstream-model"]["total_tokens"] == 8  # counted once
    reply = asyncio.run(best.ainvoke("Capital of France?"))
    assert reply.response_metadata["model_name"] == "upstream-model"
