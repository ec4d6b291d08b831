"""The reranking proxy on 127.0.0.1, called by the real openai SDK and LangChain's ChatOpenAI.

Upstreams: capplug's local server with the packaged SmolLM2, and a fault-injecting fake that
speaks raw HTTP/1.1 over its own sockets, so its faults are real ones (429 with Retry-After,
500, answers slower than the proxy's timeout, connections dropped before or halfway through an
answer, garbage bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from capplug import Scorer
from capplug.llms import LocalChatModel
from capplug.llms.retry import RetryPolicy
from capplug.serve import create_app, create_proxy_app, serve_in_thread

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(device="cpu")


# ----------------------------------------------------------------- the real local model


@pytest.fixture(scope="module")
def local_upstream() -> Iterator[str]:
    model = LocalChatModel.from_pretrained(MODEL, device="cpu")
    with serve_in_thread(create_app(model, model_name=MODEL)) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def local_proxy(local_upstream: str, scorer: Scorer) -> Iterator[str]:
    with serve_in_thread(create_proxy_app(local_upstream, scorer=scorer, n=3)) as url:
        yield url


@pytest.fixture(scope="module")
def client(local_proxy: str) -> openai.OpenAI:
    # The one change an app makes: the base URL.
    return openai.OpenAI(base_url=f"{local_proxy}/v1", api_key="x", max_retries=0, timeout=120)


def test_openai_sdk_gets_the_best_candidate_of_the_local_model(
    client: openai.OpenAI, scorer: Scorer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, n=3, temperature=0.8, max_tokens=12, seed=1
    )
    reply = raw.parse()
    meta = reply.capplug
    assert meta["n_requested"] == 3 and meta["n_received"] == 3 and meta["native_n"] is True
    assert meta["upstream_calls"] == 1 and meta["failures"] == 0
    # All three candidates come back (the request asked for n=3), best first by the fused
    # score; the scorer's signal is its own score for the conversation, and the local model's
    # logprobs (asked for by the proxy, not returned to this client) are a signal too.
    texts = [c.message.content for c in reply.choices]
    assert all(texts)
    by_candidate = dict(zip(meta["returned"], texts, strict=True))
    received = [by_candidate[i] for i in range(3)]
    # The same scores, up to bfloat16's rounding where the scorer runs at it (a pair's score
    # moves by about 1e-4 with the batch it lands in).
    assert meta["signals"]["scorer"] == pytest.approx(scorer.score(QUESTION, received), abs=1e-3)
    assert len(meta["signals"]["logprob"]) == 3 and all(v < 0 for v in meta["signals"]["logprob"])
    assert all(c.logprobs is None for c in reply.choices)
    ordered = [meta["scores"][i] for i in meta["returned"]]
    assert ordered == sorted(ordered, reverse=True) or len(set(texts)) < 3
    assert meta["chosen"] == meta["returned"][0]
    usage = reply.usage
    assert usage is not None and 10 < usage.prompt_tokens < 100
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert re.search(r"scoring;dur=[0-9.]+", raw.headers["server-timing"])


def test_openai_sdk_streams_the_chosen_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Capplug-N": "2"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[0].capplug["n_received"] == 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 2 * 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in {"stop", "length"} and set(finishes[:-1]) == {None}


def test_other_routes_and_disabled_requests_pass_through(
    client: openai.OpenAI, local_upstream: str
) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        extra_headers={"X-Capplug-Disable": "1"},
    )
    direct = httpx.post(
        f"{local_upstream}/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 8},
        timeout=120,
    ).json()
    reply = raw.parse()
    assert "x-capplug-candidates" not in raw.headers
    assert reply.model_extra.get("capplug") is None
    assert reply.choices[0].message.content == direct["choices"][0]["message"]["content"]
    # Streams pass through as the upstream streams them.
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=8,
            stream=True,
            extra_headers={"X-Capplug-Disable": "1"},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == direct["choices"][0]["message"]["content"]
    assert all(c.model_extra.get("capplug") is None for c in chunks)
    # The upstream's own errors come back as the upstream sent them.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100_000)
    assert caught.value.param == "max_tokens"


def test_langchain_chat_openai_talks_to_the_proxy(local_proxy: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        base_url=f"{local_proxy}/v1", api_key="x", model=MODEL, max_tokens=12, max_retries=0
    )
    message = chat.invoke("What is the capital of France?")
    assert isinstance(message.content, str) and message.content.strip()
    usage = message.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] <= 3 * 12  # summed over the three candidates


# ------------------------------------------------------------- a fault-injecting upstream


class FaultyUpstream:
    """An OpenAI-ish chat endpoint over raw asyncio sockets, whose faults are scripted per prompt.

    The last user turn reads ``"<key> <fault>*<times>"``: the first ``times`` attempts for that
    key meet ``fault``, later ones get a chat completion whose choices say ``"<key> #<i>"``.
    Faults: ``429`` (with Retry-After), ``500``, ``slow`` (answers after ``slow_seconds``),
    ``drop`` (closes the connection without answering), ``half`` (sends half an answer, then
    closes), ``garbage`` (200 with an HTML body). It counts attempts and answers per key.
    """

    def __init__(self, *, slow_seconds: float = 2.0, retry_after: float = 0.3) -> None:
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.attempts: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.seen_at: dict[str, list[float]] = {}
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        connections: set[asyncio.Task[None]] = set()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._connection(reader, writer)
            finally:
                connections.discard(task)

        async def stop(server: asyncio.AbstractServer) -> None:
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            await server.wait_closed()

        start = asyncio.start_server(connection, "127.0.0.1", 0)
        server = asyncio.run_coroutine_threadsafe(start, loop).result(10)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            asyncio.run_coroutine_threadsafe(stop(server), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._answer(json.loads(body), headers, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, body: dict[str, Any], headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is to be dropped."""
        key, _, script = body["messages"][-1]["content"].partition(" ")
        fault, _, times = script.partition("*")
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
            self.seen_at.setdefault(key, []).append(time.monotonic())
            self.headers.append(headers)
        if fault and attempt <= int(times or 1_000_000):
            if fault == "429":
                await _send(
                    writer, 429, b'{"error": {"message": "slow down"}}', retry=self.retry_after
                )
            elif fault == "500":
                await _send(writer, 500, b'{"error": {"message": "the model crashed"}}')
            elif fault == "slow":
                await asyncio.sleep(self.slow_seconds)
                # Too late: the proxy has given up on this attempt, so it does not count.
                await _send(writer, 200, _completion_bytes(key, body))
            elif fault == "drop":
                return False
            elif fault == "half":
                answer = _completion_bytes(key, body)
                writer.write(_head(200, len(answer)) + answer[: len(answer) // 2])
                await writer.drain()
                return False
            elif fault == "garbage":
                await _send(writer, 200, b"<html>upstream maintenance</html>", kind="text/html")
            return True
        await self._complete(writer, key, body)
        return True

    async def _complete(self, writer: asyncio.StreamWriter, key: str, body: dict[str, Any]) -> None:
        with self._lock:
            self.answered[key] += 1
        await _send(writer, 200, _completion_bytes(key, body))


def _completion_bytes(key: str, body: dict[str, Any]) -> bytes:
    n = body.get("n", 1)
    return json.dumps(
        {
            "id": f"chatcmpl-{key}",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"{key} #{i}"},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2 * n, "total_tokens": 5 + 2 * n},
        }
    ).encode()


def _head(
    status: int, length: int, *, kind: str = "application/json", retry: float | None = None
) -> bytes:
    reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error"}[status]
    extra = f"retry-after: {retry}\r\n" if retry is not None else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {length}\r\n"
        f"{extra}\r\n"
    ).encode()


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    kind: str = "application/json",
    retry: float | None = None,
) -> None:
    writer.write(_head(status, len(body), kind=kind, retry=retry) + body)
    await writer.drain()


@pytest.fixture
def faulty() -> Iterator[tuple[FaultyUpstream, str, openai.OpenAI]]:
    # The timeout leaves room for a loaded CI machine: only the scripted "slow" answers (well
    # past it) may time out, never an ordinary one.
    upstream = FaultyUpstream(slow_seconds=6.0)
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.05, jitter=0.0, max_total_seconds=30)
    with upstream.serving() as upstream_url:
        app = create_proxy_app(
            upstream_url, scorer=_LengthScorer(), n=2, retry=retry, timeout=3.0, api_key="pk"
        )
        with serve_in_thread(app) as url:
            client = openai.OpenAI(
                base_url=f"{url}/v1",
                api_key="sk-client",
                max_retries=0,  # only the proxy retries: every answer below is its first
                timeout=60,
                default_headers={"X-Capplug-Key": "pk"},
            )
            yield upstream, url, client


class _LengthScorer:
    """Scores by length, then by the last character, so the fake's '#1' beats '#0'."""

    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        return [len(r) / 100 + ord(r[-1]) / 10_000 for r in responses]


def _ask(client: openai.OpenAI, prompt: str) -> Any:
    return client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": prompt}]
    )


@pytest.mark.parametrize(
    ("script", "attempts"),
    [("429*2", 3), ("500*1", 2), ("slow*1", 2), ("drop*2", 3), ("half*1", 2)],
)
def test_transient_faults_are_retried_to_an_answer(
    faulty: tuple[FaultyUpstream, str, openai.OpenAI], script: str, attempts: int
) -> None:
    upstream, _, client = faulty
    reply = _ask(client, f"k1 {script}")
    assert reply.choices[0].message.content == "k1 #1"
    assert reply.capplug["n_received"] == 2 and reply.capplug["failures"] == 0
    assert upstream.attempts["k1"] == attempts and upstream.answered["k1"] == 1
    if script.startswith("429"):
        seen = upstream.seen_at["k1"]
        gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
        assert min(gaps) >= 0.3  # Retry-After honoured
    # The client's key went upstream; the proxy's never did.
    assert {h["authorization"] for h in upstream.headers} == {"Bearer sk-client"}
    assert not any("x-capplug-key" in h for h in upstream.headers)


@pytest.mark.parametrize(
    ("script", "error", "status", "attempts", "reason"),
    [
        ("429", openai.RateLimitError, 429, 3, "upstream answered 429: slow down"),
        ("500", openai.InternalServerError, 502, 3, "upstream answered 500: the model crashed"),
        ("slow", openai.APIStatusError, 504, 3, "ReadTimeout"),
        ("drop", openai.InternalServerError, 502, 3, "RemoteProtocolError"),
        (
            "garbage",
            openai.InternalServerError,
            502,
            1,
            "not JSON: '<html>upstream maintenance</html>'",
        ),
    ],
)
def test_lasting_faults_end_in_429_502_or_504_after_bounded_attempts(
    faulty: tuple[FaultyUpstream, str, openai.OpenAI],
    script: str,
    error: type[Exception],
    status: int,
    attempts: int,
    reason: str,
) -> None:
    upstream, _, client = faulty
    started = time.monotonic()
    with pytest.raises(error) as caught:
        _ask(client, f"k2 {script}")
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and reason in body["message"]
    assert f"after {attempts} attempt" in body["message"]
    assert upstream.attempts["k2"] == attempts and upstream.answered["k2"] == 0
    assert time.monotonic() - started < 10  # bounded in time, too


def test_langchain_chat_openai_rides_over_a_rate_limit(
    faulty: tuple[FaultyUpstream, str, openai.OpenAI],
) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    upstream, url, _ = faulty
    chat = langchain_openai.ChatOpenAI(
        base_url=f"{url}/v1",
        api_key="sk-client",
        model="fake",
        max_retries=0,
        default_headers={"X-Capplug-Key": "pk"},
    )
    message = chat.invoke("k3 429*1")
    assert message.content == "k3 #1"
    assert upstream.attempts["k3"] == 2


def test_no_request_is_lost_or_answered_twice_under_mixed_faults(
    faulty: tuple[FaultyUpstream, str, openai.OpenAI],
) -> None:
    upstream, url, client = faulty
    scripts = ["", "429*1", "500*2", "drop*1", "half*1", "slow*1", "500", "garbage", "429*2"]
    prompts = [f"m{i} {scripts[i % len(scripts)]}".strip() for i in range(36)]

    def ask(prompt: str) -> tuple[str, int, str]:
        try:
            return prompt, 200, _ask(client, prompt).choices[0].message.content
        except openai.APIStatusError as error:
            return prompt, error.status_code, ""

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, prompts))

    for prompt, status, text in results:
        key, _, script = prompt.partition(" ")
        if script in ("500", "garbage"):
            assert status == 502
            assert upstream.answered[key] == 0
        else:
            assert status == 200, prompt
            assert text == f"{key} #1"  # its own answer, nobody else's
            assert upstream.answered[key] == 1  # one successful upstream answer, used once
        assert upstream.attempts[key] <= 3
    metrics = httpx.get(f"{url}/metrics", headers={"X-Capplug-Key": "pk"}).text
    answered = sum(
        float(value)
        for value in re.findall(
            r'capplug_proxy_requests_total\{mode="rerank",status="\d+"\} (\S+)', metrics
        )
    )
    assert answered == len(prompts)  # every request answered exactly once
    attempts = float(
        re.search(r'capplug_proxy_upstream_requests_total\{mode="rerank"\} (\S+)', metrics).group(1)
    )
    assert attempts == sum(upstream.attempts.values())
