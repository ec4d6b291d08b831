"""The proxy's Responses API route, driven by the real openai SDK."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import httpx2
import openai
from fake_upstream import LookupScorer, Upstream, proxy


def response_json(text: str, *, tool_call: bool = False) -> dict[str, Any]:
    """A Responses-API object whose output is one message (or a function call)."""
    item: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    if tool_call:
        item = {
            "id": "fc_1",
            "type": "function_call",
            "call_id": "call_1",
            "name": "weather",
            "arguments": "{}",
            "status": "completed",
        }
    return {
        "id": f"resp_{abs(hash(text)) % 10**8}",
        "object": "response",
        "created_at": 1700000000,
        "model": "m-2024",
        "status": "completed",
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(text.split()),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 5 + len(text.split()),
        },
    }


class ResponsesUpstream(Upstream):
    def __init__(self, texts: list[str]) -> None:
        super().__init__(self.respond)
        self.texts = itertools.cycle(texts)

    def respond(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/responses"):
            return httpx2.Response(200, json=response_json(next(self.texts)))
        return httpx2.Response(404, json={"error": {"message": "no"}})

    def sent(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith("/responses")]


def sdk_call(app: Any, **request: Any) -> Any:
    async def call() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
            client = openai.AsyncOpenAI(
                base_url="http://proxy/v1", api_key="sk-client", http_client=http, max_retries=0
            )
            return await client.responses.with_raw_response.create(**request)

    return asyncio.run(call())


def test_a_response_is_the_best_of_n_with_usage_summed_and_the_metadata() -> None:
    upstream = ResponsesUpstream(["Lyon.", "Paris.", "Nice."])
    scorer = LookupScorer({"Paris.": 0.9, "Lyon.": 0.2, "Nice.": 0.1})
    with proxy(upstream, scorer, n=3) as client:
        raw = sdk_call(client.app, model="m", input="Capital of France?", instructions="Be brief.")
    reply = raw.parse()
    assert reply.output_text == "Paris."
    assert len(upstream.sent()) == 3 and all("n" not in b for b in upstream.sent())
    assert reply.usage.input_tokens == 15 and reply.usage.output_tokens == 3
    meta = reply.model_extra["capplug"]
    assert meta["n_received"] == 3 and meta["candidates"] == ["Lyon.", "Paris.", "Nice."]
    assert meta["chosen"] == 1 and meta["native_n"] is False
    assert raw.headers["x-capplug-candidates"] == "3"
    # The scorer read the instructions and the input.
    assert "Be brief." in scorer.calls[0][0] and "Capital of France?" in scorer.calls[0][0]


def test_requests_that_cannot_be_chosen_among_pass_through_and_say_why() -> None:
    upstream = ResponsesUpstream(["Only one."])
    tools = [{"type": "function", "name": "weather", "parameters": {}}]
    with proxy(upstream, n=3) as client:
        for extra, why in (
            ({"tools": tools}, "offers tools"),
            ({"previous_response_id": "resp_1"}, "conversation"),
        ):
            raw = sdk_call(client.app, model="m", input="Weather?", **extra)
            assert raw.parse().output_text == "Only one."
            assert why in raw.headers["x-capplug-passthrough"]
    assert len(upstream.sent()) == 2  # one call each, as the client made it


def test_bad_input_is_a_400_naming_the_field() -> None:
    with proxy(ResponsesUpstream(["x"]), n=2) as client:
        for body, param in (({"model": "m", "input": 42}, "input"), ({"model": "m"}, "input")):
            response = client.post("/v1/responses", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param
