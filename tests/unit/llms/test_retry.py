"""The shared retry policy, driven through the real openai SDK over a mock HTTP transport."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time

import httpx2
import openai
import pytest

from capplug.llms.retry import (
    RetryPolicy,
    UpstreamHTTPError,
    gather_best_effort,
    is_retryable,
    retry_after_seconds,
    without_sdk_retries,
)

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class Upstream:
    """A scripted upstream: each request takes the next answer; the last one repeats."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.attempts = 0

    def _next(self, request: httpx2.Request) -> httpx2.Response:
        answer = self.answers[min(self.attempts, len(self.answers) - 1)]
        self.attempts += 1
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx2.Response):
            return answer
        status, headers, body = answer
        return httpx2.Response(status, headers=headers, content=body)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        return self._next(request)

    def client(self, *, max_retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url="http://upstream.test/v1",
            api_key="sk-test",
            max_retries=max_retries,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self)),
        )

    def async_client(self, *, max_retries: int = 0) -> openai.AsyncOpenAI:
        async def handler(request: httpx2.Request) -> httpx2.Response:
            return self._next(request)

        return openai.AsyncOpenAI(
            base_url="http://upstream.test/v1",
            api_key="sk-test",
            max_retries=max_retries,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        )


OK = (200, {"content-type": "application/json"}, json.dumps(COMPLETION).encode())


def error(status: int, **headers: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": {"message": f"status {status}", "type": "x"}}).encode()
    return status, {"content-type": "application/json", **headers}, body


def policy(**overrides) -> tuple[RetryPolicy, list[float]]:
    sleeps: list[float] = []

    async def async_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    settings = {"max_attempts": 4, "initial_backoff": 0.1, "jitter": 0.0}
    settings.update(overrides)
    return RetryPolicy(sleep=sleeps.append, async_sleep=async_sleep, **settings), sleeps


def create(client: openai.OpenAI):
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of France?"}]
    )


def test_rate_limit_waits_for_retry_after_then_succeeds():
    upstream = Upstream(error(429, **{"retry-after": "3"}), OK)
    retry, sleeps = policy()
    reply = retry.call(create, upstream.client())
    assert reply.choices[0].message.content == "Paris"
    assert upstream.attempts == 2
    assert sleeps == [3.0]


def test_retry_after_ms_is_preferred_and_an_http_date_is_understood():
    upstream = Upstream(error(503, **{"retry-after-ms": "250", "retry-after": "9"}), OK)
    retry, sleeps = policy(initial_backoff=0.0)
    retry.call(create, upstream.client())
    assert sleeps == [0.25]
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    asked = retry_after_seconds(UpstreamHTTPError(503, "busy", retry_after=None))
    assert asked is None
    response = httpx2.Response(429, headers={"retry-after": later})
    err = openai.RateLimitError("slow down", response=_with_request(response), body=None)
    assert 25 <= retry_after_seconds(err) <= 31


def _with_request(response: httpx2.Response) -> httpx2.Response:
    response.request = httpx2.Request("POST", "http://upstream.test/v1/chat/completions")
    return response


def test_server_errors_stop_after_max_attempts_and_raise_the_last_error():
    upstream = Upstream(error(500))
    retry, sleeps = policy(max_attempts=3)
    with pytest.raises(openai.InternalServerError):
        retry.call(create, upstream.client())
    assert upstream.attempts == 3
    assert sleeps == pytest.approx([0.1, 0.2])  # exponential backoff


def test_sdk_retries_are_turned_off_so_attempts_never_multiply():
    upstream = Upstream(error(502))
    retry, _ = policy(max_attempts=3)
    client = retry.wrap_client(upstream.client(max_retries=4))
    assert client.max_retries == 0
    with pytest.raises(openai.APIStatusError):
        retry.call(create, client)
    assert upstream.attempts == 3


def test_timeouts_and_dropped_connections_are_retried():
    upstream = Upstream(
        httpx2.ReadTimeout("read timed out"), httpx2.RemoteProtocolError("dropped"), OK
    )
    retry, sleeps = policy()
    reply = retry.call(create, upstream.client())
    assert reply.choices[0].message.content == "Paris"
    assert upstream.attempts == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    "answer",
    [
        error(400),
        error(401),
        error(404),
        (200, {"content-type": "application/json"}, b"{not json"),
    ],
    ids=["bad-request", "unauthorised", "not-found", "malformed-body"],
)
def test_errors_that_would_repeat_are_not_retried(answer):
    upstream = Upstream(answer, OK)
    retry, sleeps = policy()
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own class for each case
        retry.call(create, upstream.client())
    assert upstream.attempts == 1
    assert sleeps == []


def test_a_retry_after_beyond_the_bounds_gives_up_at_once():
    upstream = Upstream(error(429, **{"retry-after": "120"}), OK)
    retry, sleeps = policy(max_retry_after=30)
    with pytest.raises(openai.RateLimitError):
        retry.call(create, upstream.client())
    assert upstream.attempts == 1 and sleeps == []

    upstream = Upstream(error(429, **{"retry-after": "5"}), OK)
    retry, sleeps = policy(max_total_seconds=2)
    with pytest.raises(openai.RateLimitError):
        retry.call(create, upstream.client())
    assert upstream.attempts == 1 and sleeps == []


def test_each_sleep_is_logged_and_reported(caplog):
    events = []
    upstream = Upstream(error(429, **{"retry-after": "1"}), error(500), OK)
    retry, _ = policy(on_retry=events.append)
    with caplog.at_level(logging.WARNING, logger="capplug.llms.retry"):
        retry.call(create, upstream.client())
    assert [e.attempt for e in events] == [1, 2]
    assert events[0].retry_after == 1.0 and isinstance(events[1].error, openai.InternalServerError)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "retrying in 1.00s" in messages[0]
    assert "sk-test" not in caplog.text


def test_async_calls_follow_the_same_policy():
    upstream = Upstream(error(503), error(429, **{"retry-after": "2"}), OK)
    retry, sleeps = policy()

    async def run():
        client = upstream.async_client()
        return await retry.acall(
            client.chat.completions.create,
            model="m",
            messages=[{"role": "user", "content": "Capital of France?"}],
        )

    reply = asyncio.run(run())
    assert reply.choices[0].message.content == "Paris"
    assert upstream.attempts == 3
    assert sleeps == pytest.approx([0.1, 2.0])


def test_wrap_decorates_sync_and_async_functions():
    retry, _ = policy(max_attempts=2)
    calls = []

    @retry.wrap
    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("reset")
        return "ok"

    @retry.wrap
    async def always_down():
        calls.append(2)
        raise UpstreamHTTPError(503, "down")

    assert flaky() == "ok"
    with pytest.raises(UpstreamHTTPError, match="503"):
        asyncio.run(always_down())
    assert calls == [1, 1, 2, 2]


def test_which_errors_are_retryable():
    assert is_retryable(UpstreamHTTPError(429, "x"))
    assert is_retryable(UpstreamHTTPError(504, "x"))
    assert not is_retryable(UpstreamHTTPError(400, "x"))
    assert is_retryable(TimeoutError())
    assert is_retryable(httpx2.ConnectError("refused"))
    assert not is_retryable(ValueError("bad"))
    assert not is_retryable(KeyError("x"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(TypeError, match="max_attempts"):
        RetryPolicy(max_attempts=2.5)
    with pytest.raises(ValueError, match="max_total_seconds"):
        RetryPolicy(max_total_seconds=-1)


def test_without_sdk_retries_leaves_other_objects_alone():
    thing = object()
    assert without_sdk_retries(thing) is thing
    client = Upstream(OK).client(max_retries=3)
    assert without_sdk_retries(client).max_retries == 0
    assert client.max_retries == 3  # the caller's client is untouched


def test_gather_best_effort_keeps_what_arrived_or_raises_the_last_error():
    async def ok(value):
        return value

    async def fail(message):
        raise UpstreamHTTPError(500, message)

    results, failures = asyncio.run(gather_best_effort([ok(1), fail("a"), ok(3)], min_successes=2))
    assert results == [1, 3] and len(failures) == 1
    with pytest.raises(UpstreamHTTPError, match="b"):
        asyncio.run(gather_best_effort([ok(1), fail("a"), fail("b")], min_successes=2))
