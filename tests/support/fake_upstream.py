"""A scripted OpenAI upstream on httpx2's MockTransport and the proxy in front of it, in-process."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
from fastapi.testclient import TestClient

from capplug.llms.retry import RetryPolicy
from capplug.serve import create_proxy_app

UPSTREAM = "http://upstream.test/v1"
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
CHAT = {"model": "m", "messages": MESSAGES}

Answer = Callable[[httpx2.Request], "httpx2.Response | Awaitable[httpx2.Response]"]


def completion(texts: list[str], *, prompt_tokens: int = 10, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat completion with one choice per text; 1 completion token per word."""
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m-2024",
        "system_fingerprint": "fp_up",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i, text in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(len(t.split()) for t in texts),
            "total_tokens": prompt_tokens + sum(len(t.split()) for t in texts),
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        **extra,
    }


class Upstream:
    """A scripted OpenAI-compatible upstream: records every request, answers with ``answer``.

    By default it honours ``n`` and answers "answer 1", "answer 2", ... counting across requests,
    so every candidate differs.
    """

    def __init__(self, answer: Answer | None = None, *, honours_n: bool = True) -> None:
        self.requests: list[httpx2.Request] = []
        self.answer = answer or self.candidates
        self.honours_n = honours_n
        self._count = itertools.count(1)

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        self.requests.append(request)
        answer = self.answer(request)
        return await answer if asyncio.iscoroutine(answer) else answer  # type: ignore[return-value]

    def candidates(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/responses"):  # the Responses API: one answer a call
            text = f"answer {next(self._count)}"
            message = {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
            return httpx2.Response(
                200, json={"id": "resp_up", "object": "response", "output": [message]}
            )
        if not request.url.path.endswith("/chat/completions"):
            return httpx2.Response(200, json={"object": "list", "data": []})
        try:  # a fuzzed path can pass an empty or non-JSON body through: refuse it, as an API would
            body = json.loads(request.content)
        except ValueError:
            return httpx2.Response(400, json={"error": {"message": "the body is not JSON"}})
        n = body.get("n", 1) if self.honours_n and isinstance(body, dict) else 1
        return httpx2.Response(
            200, json=completion([f"answer {next(self._count)}" for _ in range(n)])
        )

    def bodies(self) -> list[dict[str, Any]]:
        return [
            json.loads(r.content) for r in self.requests if r.url.path.endswith("/chat/completions")
        ]

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self)


class LookupScorer:
    """Scores each response from a table (0.0 when absent); records what it was asked."""

    def __init__(self, table: dict[str, float] | None = None) -> None:
        self.table = table or {}
        self.calls: list[tuple[str, list[str]]] = []

    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        self.calls.append((instruction, list(responses)))
        return [self.table.get(r, 0.0) for r in responses]


class Sleeps:
    """A fake async sleep for the retry policy: records the waits, sleeps not at all."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def fast_retry(sleeps: Sleeps, attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=attempts, initial_backoff=0.0, max_backoff=0.0, jitter=0.0, async_sleep=sleeps
    )


def proxy(upstream: Upstream, scorer: Any = None, **options: Any) -> TestClient:
    options.setdefault("retry", fast_retry(Sleeps()))
    app = create_proxy_app(
        UPSTREAM, scorer=scorer or LookupScorer(), transport=upstream.transport(), **options
    )
    return TestClient(app)


def post(client: TestClient, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx2.Response:
    return client.post("/v1/chat/completions", json=CHAT if body is None else body, **kwargs)


def ok(response: httpx2.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def server_timing(response: httpx2.Response) -> dict[str, float]:
    """The ``Server-Timing`` entries of a response, in ms."""
    entries = [part.strip().split(";dur=") for part in response.headers["server-timing"].split(",")]
    return {name: float(ms) for name, ms in entries}


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The value of one Prometheus sample from /metrics (0.0 when it is not there)."""
    text = client.get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0
