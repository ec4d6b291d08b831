"""The reranking proxy under hostile input and partial failure: every defect found by probing it
gets a test here (text that is not Unicode, bodies nested without end, paths that climb out of
the upstream's base, attempts that multiply across the client boundary)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from typing import Any

import httpx2
import openai
import pytest
from fake_upstream import (
    MESSAGES,
    Sleeps,
    Upstream,
    completion,
    error_of,
    fast_retry,
    ok,
    post,
    proxy,
)
from fastapi import FastAPI
from fastapi.testclient import TestClient

from capplug.llms.retry import RetryPolicy
from capplug.serve._http import install_error_handlers
from capplug.serve._scoring_queue import ScoringQueue
from capplug.serve.proxy import app as proxy_module

KEY = "sk-upstream-secret"


def raw_post(client: Any, body: str, path: str = "/v1/chat/completions") -> httpx2.Response:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


# --------------------------------------------------------------------- text and nesting (D1)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages":[{"role":"user","content":"hi \\ud800"}]}', "messages[0].content"),
        ('{"model":"m\\udfff","messages":[{"role":"user","content":"hi"}]}', "model"),
        (
            '{"messages":[{"role":"user","content":[{"type":"text","text":"\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(body: str, param: str) -> None:
    upstream = Upstream()
    client = proxy(upstream)
    error = error_of(raw_post(client, body), 400)
    assert error["param"] == param and "surrogate" in error["message"]
    assert upstream.requests == []  # nothing went upstream


@pytest.mark.parametrize(
    "body",
    [
        '{"messages":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"messages":[{"role":"user","content":' + "[" * 50_000 + "]" * 50_000 + "}]}",
        '{"messages":[{"role":"user","content":"hi"}],"metadata":'
        + '{"a":' * 5_000
        + "1"
        + "}" * 5_000
        + "}",
        # Deep, but not deep enough for the JSON parser to give up: refused all the same.
        '{"messages":[{"role":"user","content":"hi"}],"metadata":' + "[" * 200 + "]" * 200 + "}",
    ],
)
def test_a_body_nested_without_end_is_a_400_not_a_crash(body: str) -> None:
    upstream = Upstream()
    client = proxy(upstream)
    error = error_of(raw_post(client, body), 400)
    assert "nests deeper" in error["message"]
    assert upstream.requests == []


def test_a_crash_answers_500_without_the_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    # Every capplug server installs the same handlers; a route that crashes stands for any bug.
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail /srv/keys/upstream.txt")

    with caplog.at_level(logging.ERROR, logger="capplug.serve"):
        response = TestClient(app, raise_server_exceptions=False).get("/boom")
    error = error_of(response, 500)
    assert "secret detail" not in response.text and "RuntimeError" not in response.text
    incident = error["message"].split("incident ")[1].split(")")[0]
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


# ------------------------------------------------------------------- paths out of the base (D3)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/%2e%2e/%2e%2e/admin/keys",
        "/v1/%2E%2E/admin",
        "/v1/..%2f..%2fadmin",
        "/v1/models%2f..%2f..%2fsecret",
        "/v1/../admin",
        "/v1/models/../../admin",
        "/v1/%252e%252e/%252e%252e/admin",
        "/v1/models/.",
        "/v1/models%5c..%5c..%5cadmin",
        "/v1/..;/admin",  # Tomcat-style path parameters: ..; is ..
        "/v1/.;jsessionid=1/admin",
        "/v1//evil.example/x",  # an empty segment
        "/v1/%u002e%u002e/secret",  # IIS-style %u escapes
        "/v1/%25u002e%25u002e/secret",
        "/v1/%E2%80%AE",  # a right-to-left override
        "/v1/models%E2%80%8B",  # a zero-width space
        "/v1/models%C2%85x",  # a next-line control
    ],
)
def test_a_path_that_climbs_out_of_the_base_never_reaches_the_upstream(path: str) -> None:
    upstream = Upstream()
    client = proxy(upstream, upstream_api_key=KEY)
    status, body = send_raw_path(client.app, path)  # as `curl --path-as-is` sends it
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_path"
    assert upstream.requests == []
    assert KEY.encode() not in body


def test_ordinary_paths_still_pass() -> None:
    upstream = Upstream()
    client = proxy(upstream, upstream_api_key=KEY)
    for path in ("/v1/models", "/v1/models/", "/v1/files/file-abc;x=1", "/v1/models/caf%C3%A9"):
        status, _ = send_raw_path(client.app, path)
        assert status != 400, path


def send_raw_path(
    app: Any,
    raw_path: str,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """Call the ASGI app with the path exactly as given: HTTP clients (httpx, the test client)
    resolve ``..`` themselves before sending, servers such as uvicorn do not."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": urllib.parse.unquote(raw_path, errors="surrogateescape"),
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"proxy.test"), (b"content-length", str(len(body)).encode())]
        + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1),
        "server": ("proxy.test", 80),
    }
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if "body" in m)


def test_ordinary_pass_through_paths_still_forward_under_the_base() -> None:
    upstream = Upstream()
    client = proxy(upstream, upstream_api_key=KEY)
    ok(client.get("/v1/models"))
    ok(client.get("/v1/files/file-abc.jsonl"))  # a dot inside a segment is fine
    sent = [r.url.path for r in upstream.requests]
    assert sent == ["/v1/models", "/v1/files/file-abc.jsonl"]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in upstream.requests)


def test_messages_still_pass_when_valid() -> None:
    upstream = Upstream()
    ok(post(proxy(upstream), {"model": "m", "messages": MESSAGES}))
    assert json.loads(upstream.requests[0].content)["messages"] == MESSAGES


# ------------------------------------------------------- attempts across the boundary (D4-D6)


def lasting(fault: int | Exception = 500) -> Upstream:
    """An upstream that fails every chat request the same way: a status, or a transport error."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        if isinstance(fault, Exception):
            raise fault
        return httpx2.Response(fault, json={"error": {"message": "down"}})

    return Upstream(answer)


async def sdk_call(app: Any, *, max_retries: int = 2, **create: Any) -> Any:
    """One chat completion through the real openai SDK (its default retries unless told):
    the reply, or the APIStatusError it raised."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    async with openai.AsyncOpenAI(
        base_url="http://proxy.test/v1",
        api_key="sk-client",
        http_client=http,
        max_retries=max_retries,
    ) as client:
        try:
            return await client.chat.completions.create(
                model="m",
                messages=MESSAGES,
                **create,  # type: ignore[arg-type]
            )
        except openai.APIStatusError as error:
            return error


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ({"n": 4}, 500),  # one native request
        ({"n": 8, "native_n": "never"}, 500),  # fan-out: eight single requests
        ({"n": 8, "native_n": "never"}, 503),
        ({"n": 3}, 429),
        ({"n": 8, "native_n": "never"}, httpx2.ConnectError("connection refused")),
        ({"n": 4}, httpx2.ReadTimeout("timed out")),
    ],
)
def test_a_lasting_failure_costs_the_configured_attempts_with_sdk_retries(
    options: dict[str, Any], fault: int | Exception
) -> None:
    upstream = lasting(fault)
    app = proxy(upstream, retry=fast_retry(Sleeps(), attempts=3), **options).app
    error = asyncio.run(sdk_call(app))  # the SDK would retry a 502 twice more on its own
    status = 504 if isinstance(fault, httpx2.TimeoutException) else 502
    if fault == 429:  # still rate limited after the proxy's own retries: a rate limit
        status = 429
        assert isinstance(error, openai.RateLimitError)
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    assert error.response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 3, [json.loads(r.content).get("n") for r in upstream.requests]
    assert "3 attempts" in error.message


def test_a_healthy_fan_out_still_gets_every_candidate_within_the_budget() -> None:
    in_flight, most = 0, 0

    async def answer(request: httpx2.Request) -> httpx2.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx2.Response(
            200, json=completion([f"seed {json.loads(request.content)['seed']}"])
        )

    upstream = Upstream(answer)
    client = proxy(upstream, n=8, native_n="never", retry=fast_retry(Sleeps(), attempts=3))
    reply = ok(post(client, {"model": "m", "messages": MESSAGES, "seed": 0}))
    assert reply["capplug"]["n_received"] == 8 and len(upstream.requests) == 8
    assert most <= 3  # at most the attempt budget in flight at once


def test_fan_out_with_some_failures_spends_only_the_budget() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        seed = json.loads(request.content)["seed"]
        if seed % 2:
            return httpx2.Response(500, json={"error": {"message": "odd seeds fail"}})
        return httpx2.Response(200, json=completion([f"seed {seed}"]))

    upstream = Upstream(answer)
    client = proxy(upstream, n=8, native_n="never", retry=fast_retry(Sleeps(), attempts=3))
    reply = ok(post(client, {"model": "m", "messages": MESSAGES, "seed": 0}))
    failed = [r for r in upstream.requests if json.loads(r.content)["seed"] % 2]
    assert len(failed) == 3  # the budget: three failed attempts, then no more attempts at all
    received = reply["capplug"]["n_received"]
    assert received >= 1 and len(upstream.requests) == received + 3
    assert reply["capplug"]["failures"] == 8 - received  # the calls never made count as failed


def test_one_short_reply_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    short_once = iter([True])

    def answer(request: httpx2.Request) -> httpx2.Response:
        n = json.loads(request.content).get("n", 1)
        if n > 1 and next(short_once, False):
            n = 1  # one reply with fewer choices than asked
        return httpx2.Response(200, json=completion([f"a{i}" for i in range(n)]))

    upstream = Upstream(answer)
    client = proxy(upstream, n=4)
    with caplog.at_level(logging.WARNING, logger="capplug.serve.proxy"):
        first = ok(post(client))
        later = [ok(post(client)) for _ in range(3)]
    assert first["capplug"]["upstream_calls"] == 4  # topped up with single requests
    assert all(r["capplug"]["native_n"] and r["capplug"]["upstream_calls"] == 1 for r in later)
    assert not [r for r in caplog.records if "one choice" in r.getMessage()]


def test_a_client_that_goes_away_stops_the_retries() -> None:
    upstream = lasting(500)
    slow = RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.05, jitter=0.0)
    app = proxy(upstream, n=2, retry=slow).app
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()

    async def scenario() -> tuple[int, int, list[dict[str, Any]]]:
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is not None:
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"proxy.test"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("proxy.test", 80),
        }
        serving = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.3)  # a few attempts, with backoff between them
        gone.set()  # the client times out and closes the connection
        await asyncio.wait_for(serving, 5)
        at_disconnect = len(upstream.requests)
        await asyncio.sleep(0.5)  # ten more backoffs' worth
        return at_disconnect, len(upstream.requests), sent

    at_disconnect, later, sent = asyncio.run(scenario())
    assert 2 <= at_disconnect < 50
    assert later == at_disconnect  # not one attempt after the client left
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 499


# ------------------------------------------------------------ a huge body holds nothing up (D7)


class PairScorer:
    """Scores each pair on its own, taking 1 ms per 100 characters; records each call."""

    max_length = 512

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        self.calls.append(list(pairs))
        time.sleep(sum(min(len(i), 2048) + len(r) for i, r in pairs) / 100_000)
        return [len(r) / 100 for _, r in pairs]

    def score(self, instruction: str, responses: list[str]) -> list[float]:
        return self.score_pairs([(instruction, r) for r in responses])


def test_a_small_request_is_scored_between_the_slices_of_a_huge_one() -> None:
    scorer = PairScorer()
    queue = ScoringQueue(scorer)
    huge = "all work and no play " * 250_000  # 5 MB of conversation
    small = "What is the capital of France?"

    async def scenario() -> tuple[list[float], list[float]]:
        big = asyncio.ensure_future(queue.score(huge, [f"answer {i}" for i in range(8)]))
        for _ in range(5000):  # until the first slice is being scored, however busy the CPU
            if scorer.calls:
                break
            await asyncio.sleep(0.001)
        scores = await queue.score(small, ["Paris", "Lyon"])
        assert not big.done()  # answered before the huge one
        return scores, await big

    small_scores, big_scores = asyncio.run(scenario())
    assert small_scores == [0.05, 0.04] and big_scores == [0.08] * 8
    big_calls = [c for c in scorer.calls if c[0][0] == huge]
    assert len(big_calls) >= 2 and len(big_calls[0]) == 1  # sliced, from 512 tokens' worth
    assert all(len({i for i, _ in call}) == 1 for call in scorer.calls)  # never mixed
    small_call = next(i for i, c in enumerate(scorer.calls) if c[0][0] == small)
    assert 1 <= small_call < len(scorer.calls) - 1  # between the slices


def test_a_big_request_that_waited_long_still_lets_a_small_one_go_between_its_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ageing (priority for time waited) once let a big request that had waited a while take
    # every remaining slice ahead of small requests arriving in its last phase: 0.4-0.8 s waits
    # behind a 5 MB body. Ageing as if it had waited for ages: small ones still go first.
    import capplug.serve._scoring_queue as scoring_queue

    monkeypatch.setattr(scoring_queue, "_AGEING_TOKENS_PER_SECOND", 10**9)
    scorer = PairScorer()
    queue = ScoringQueue(scorer)
    huge = "all work and no play " * 250_000

    async def scenario() -> None:
        big = asyncio.ensure_future(queue.score(huge, [f"answer {i}" for i in range(8)]))
        for _ in range(5000):
            if scorer.calls:
                break
            await asyncio.sleep(0.001)
        await queue.score("What is the capital of France?", ["Paris", "Lyon"])
        assert not big.done()
        await big

    asyncio.run(scenario())
    small_call = next(i for i, c in enumerate(scorer.calls) if c[0][0] != huge)
    big_calls = sum(c[0][0] == huge for c in scorer.calls)
    assert small_call <= 2 < big_calls  # beside the slices, not after all of them


def test_a_stream_of_small_requests_never_starves_a_big_one() -> None:
    scorer = PairScorer()
    queue = ScoringQueue(scorer)
    huge = "all work and no play " * 250_000

    async def scenario() -> int:
        big = asyncio.ensure_future(queue.score(huge, [f"answer {i}" for i in range(6)]))
        smalls = 0
        while not big.done():  # small requests back to back, never fewer than one waiting
            await asyncio.gather(*(queue.score(f"q{smalls} {k}", ["a"]) for k in range(3)))
            smalls += 3
            assert smalls < 3000, "the big request starved"
        return smalls

    assert asyncio.run(scenario()) > 0


def test_slices_grow_to_about_a_tenth_of_a_second_of_measured_scoring() -> None:
    # Each long pair costs 512 tokens and takes the fake scorer 20 ms: after the first slice
    # (512 tokens), the queue has measured about 25,000 tokens/s and slices 0.1 s of that.
    scorer = PairScorer()
    queue = ScoringQueue(scorer)
    huge = "all work and no play " * 250_000
    asyncio.run(queue.score(huge, [f"answer {i}" for i in range(16)]))
    sizes = [len(call) for call in scorer.calls]
    assert sizes[0] == 1 and sum(sizes) == 16
    assert max(sizes) <= 5  # never more than 0.1 s of work at the measured rate
    assert len(sizes) < 16  # fewer, bigger calls than one pair each


def test_small_requests_waiting_together_are_still_scored_in_one_call() -> None:
    scorer = PairScorer()
    queue = ScoringQueue(scorer)

    async def scenario() -> None:
        await asyncio.gather(*(queue.score(f"question {i}", ["a", "b", "c"]) for i in range(20)))

    asyncio.run(scenario())
    # Batched: the first call may hold only the first request (the worker wakes as it arrives),
    # and a busy machine may let a few more in late; never one call per request.
    assert len(scorer.calls) <= 5 and sum(len(c) for c in scorer.calls) == 60


# ------------------------------------------------------------------------- smaller defects


def test_a_pass_through_body_cut_short_is_a_quiet_499(caplog: pytest.LogCaptureFixture) -> None:
    upstream = Upstream()
    app = proxy(upstream).app
    cut_short = {"type": "http.request", "body": b'{"purpose":', "more_body": True}
    messages = iter([cut_short, {"type": "http.disconnect"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/files", "raw_path": b"/v1/files", "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 1), "server": ("proxy.test", 80),
        "headers": [(b"host", b"proxy.test"), (b"content-length", b"100")],
    }  # fmt: skip
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))  # raises nothing: no traceback for uvicorn
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_key_in_the_query_string_never_reaches_the_access_log() -> None:
    import io

    import uvicorn.config
    import uvicorn.logging

    names = ("uvicorn", "uvicorn.access", "uvicorn.error")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    access = logging.getLogger("uvicorn.access")
    sink = io.StringIO()
    try:
        app = proxy(Upstream()).app
        uvicorn.config.Config(app, log_level="info").configure_logging()  # as `capplug proxy`
        handler = logging.StreamHandler(sink)
        handler.setFormatter(uvicorn.logging.AccessFormatter(use_colors=False))
        access.handlers = [handler]
        for path in (
            f"/v1/models?api-key={KEY}",
            f"/v1/models?x=1&API_KEY={KEY}&y=2",
            f"/v1/files?access_token={KEY}",
            f"/v1/files?sig={KEY}#frag",
        ):
            access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", path, "1.1", 200)
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers = handlers
            logging.getLogger(name).propagate = propagate
    logged = sink.getvalue()
    assert KEY not in logged and logged.count("\n") == 4
    assert "api-key=***" in logged and "x=1&API_KEY=***&y=2" in logged


def test_credentials_in_the_upstream_url_are_refused() -> None:
    with pytest.raises(ValueError, match="must not carry a user name or password") as caught:
        proxy_module.create_proxy_app("https://user:hunter2@api.example.com/v1", scorer=object())
    assert "hunter2" not in str(caught.value)


def test_scoring_threads_split_each_call_and_keep_the_order() -> None:
    scorer = PairScorer()
    queue = ScoringQueue(scorer, threads=2)
    responses = [f"answer {'x' * i}" for i in range(7)]
    scores = asyncio.run(queue.score("What is the capital of France?", responses))
    assert scores == [len(r) / 100 for r in responses]  # in order, every one
    assert sorted(len(call) for call in scorer.calls) == [3, 4]  # one part per thread
    assert {r for call in scorer.calls for _, r in call} == set(responses)


def test_a_lasting_rate_limit_reaches_the_sdk_as_a_rate_limit_with_its_retry_after() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            429, headers={"Retry-After": "30"}, json={"error": {"message": "slow down"}}
        )

    upstream = Upstream(answer)
    app = proxy(upstream, n=2, retry=fast_retry(Sleeps(), attempts=2)).app
    error = asyncio.run(sdk_call(app))
    assert isinstance(error, openai.RateLimitError)
    assert error.response.headers["retry-after"] == "30"
    assert error.body["code"] == "rate_limit_exceeded" and "slow down" in error.message
    assert len(upstream.requests) == 2  # the proxy's attempts; the SDK adds none


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("temperature", 2.5),
        ("top_p", -5),
        ("top_p", True),
        ("presence_penalty", 3),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("top_logprobs", 21),
        ("seed", "7"),
        ("logprobs", "yes"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 3),
    ],
)
def test_a_sampling_field_out_of_range_is_a_400_naming_it_before_any_upstream_call(
    field: str, value: Any
) -> None:
    upstream = Upstream()
    client = proxy(upstream, n=2)
    response = client.post(
        "/v1/chat/completions",
        content=json.dumps({"model": "m", "messages": MESSAGES, field: value}),
        headers={"content-type": "application/json"},
    )
    error = error_of(response, 400)
    assert error["param"] == field and error["code"] == "invalid_value"
    assert upstream.requests == []


def test_an_upstream_refusal_costs_one_call() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            400,
            json={
                "error": {
                    "message": "model not found",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        )

    upstream = Upstream(answer)
    response = post(proxy(upstream, n=4))
    assert error_of(response, 400)["message"] == "model not found"  # relayed as it came
    assert len(upstream.requests) == 1
