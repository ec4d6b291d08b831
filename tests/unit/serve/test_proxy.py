"""The reranking proxy in-process: a scripted upstream on httpx2's MockTransport, no sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fake_upstream import (
    CHAT,
    MESSAGES,
    UPSTREAM,
    LookupScorer,
    Sleeps,
    Upstream,
    completion,
    error_of,
    fast_retry,
    metric,
    ok,
    post,
    proxy,
    server_timing,
)
from fastapi.testclient import TestClient

from capplug import Scorer, flatten_chat
from capplug.cli import main
from capplug.selection import METADATA_KEYS
from capplug.serve import create_proxy_app
from capplug.serve.proxy._candidates import FAN_OUT_SIGHTINGS, Quirks


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture(scope="module")
def tiny_scorer(tiny_bert_scorer: Path) -> Scorer:
    return Scorer.from_pretrained(tiny_bert_scorer, device="cpu")


# ---------------------------------------------------------------------------- reranking


def test_returns_the_best_of_n_with_scores_and_summed_usage() -> None:
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Lyon", "Paris", "Nice"])))
    scorer = LookupScorer({"Lyon": 0.2, "Paris": 0.9, "Nice": 0.1})
    with proxy(upstream, scorer, n=3) as client:
        reply = ok(post(client, headers={"Authorization": "Bearer sk-client"}))

    # One upstream request, asking for the 3 candidates natively, without streaming.
    (sent,) = upstream.bodies()
    assert sent == {**CHAT, "n": 3, "logprobs": True}  # logprobs: a selection signal
    assert upstream.requests[0].headers["authorization"] == "Bearer sk-client"

    # A standard chat completion, from the upstream's, whose one choice is the best candidate.
    assert reply["id"] == "chatcmpl-up" and reply["object"] == "chat.completion"
    assert reply["model"] == "m-2024" and reply["system_fingerprint"] == "fp_up"
    assert len(reply["choices"]) == 1
    assert reply["choices"][0]["index"] == 0
    assert reply["choices"][0]["message"]["content"] == "Paris"
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    meta = reply["capplug"]
    assert meta["signals"]["scorer"] == [0.2, 0.9, 0.1]
    assert sum(meta["scores"]) == pytest.approx(1.0, abs=1e-5)  # the fused probabilities
    assert meta["chosen"] == 1 and meta["returned"] == [1]
    assert meta["n_requested"] == 3 and meta["n_received"] == 3
    assert meta["failures"] == 0 and meta["errors"] == []
    assert meta["upstream_calls"] == 1 and meta["native_n"] is True
    assert meta["reason"] is None and meta["candidates"] == ["Lyon", "Paris", "Nice"]
    # The one metadata schema (the LangChain components report the same keys), plus the
    # proxy's own: which choices went back, and the time upstream and scoring took.
    proxy_own = {"returned", "upstream_seconds", "scoring_seconds"}
    assert set(meta) == set(METADATA_KEYS) | proxy_own
    # The scorer read the whole conversation, not just the last turn.
    assert scorer.calls == [(flatten_chat(MESSAGES), ["Lyon", "Paris", "Nice"])]


def test_the_real_scorer_picks_its_own_favourite(tiny_scorer: Scorer) -> None:
    texts = ["paris", "lyon is a city", "the capital of france is paris", "no", "london"]
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(texts)))
    with proxy(upstream, tiny_scorer, n=5) as client:
        response = post(client)
    reply = ok(response)
    expected = tiny_scorer.score(MESSAGES, texts)
    meta = reply["capplug"]
    assert meta["signals"]["scorer"] == pytest.approx(expected, abs=1e-6)
    # The selection core chose: its best fused score is the answer returned.
    best = max(range(len(texts)), key=meta["scores"].__getitem__)
    assert meta["chosen"] == best and reply["choices"][0]["message"]["content"] == texts[best]
    timing = server_timing(response)
    assert set(timing) == {"upstream", "scoring", "total"}
    assert timing["scoring"] > 0 and timing["upstream"] > 0
    assert timing["total"] >= timing["scoring"] + timing["upstream"]
    assert reply["capplug"]["scoring_seconds"] == pytest.approx(timing["scoring"] / 1000, abs=1e-5)
    assert response.headers["x-capplug-candidates"] == "5"


def test_an_upstream_that_ignores_n_gets_single_requests_and_is_remembered() -> None:
    upstream = Upstream(honours_n=False)
    with proxy(upstream, n=4) as client:
        first = [ok(post(client)) for _ in range(FAN_OUT_SIGHTINGS)]
        later = ok(post(client))
        other_model = ok(post(client, {**CHAT, "model": "other"}))
        fanned_out = metric(client, "capplug_proxy_fanned_out_models")

    bodies = upstream.bodies()
    # Each first request: n=4 came back with one choice, so three single requests made up the
    # rest; after the third such answer the model is believed to ignore n.
    for i, reply in enumerate(first):
        assert [b.get("n") for b in bodies[4 * i : 4 * i + 4]] == [4, None, None, None]
        assert reply["capplug"]["n_received"] == 4 and reply["capplug"]["upstream_calls"] == 4
    assert first[0]["usage"]["prompt_tokens"] == 4 * 10  # summed over all four calls
    assert first[0]["usage"]["completion_tokens"] == 4 * 2
    # The next request, same model: single requests straight away.
    k = 4 * FAN_OUT_SIGHTINGS
    assert [b.get("n") for b in bodies[k : k + 4]] == [None] * 4
    assert later["capplug"]["native_n"] is False and later["capplug"]["upstream_calls"] == 4
    # Another model is tried natively again.
    assert bodies[k + 4].get("n") == 4 and other_model["capplug"]["n_received"] == 4
    assert len(bodies) == k + 8
    assert fanned_out == 1


def test_single_requests_get_their_own_seeds_and_keep_their_order() -> None:
    async def answer(request: httpx2.Request) -> httpx2.Response:
        seed = json.loads(request.content)["seed"]
        await asyncio.sleep((10 - seed) / 100)  # the first call made answers last
        return httpx2.Response(200, json=completion([f"seed {seed}"]))

    upstream = Upstream(answer)
    with proxy(upstream, n=3, native_n="never") as client:  # every score 0.0: a three-way tie
        reply = ok(post(client, {**CHAT, "seed": 5, "n": 3}))
    assert sorted(b["seed"] for b in upstream.bodies()) == [5, 6, 7]
    assert all("n" not in b for b in upstream.bodies())
    # Ties keep the order the calls were made in, not the order their answers arrived in.
    assert [c["message"]["content"] for c in reply["choices"]] == ["seed 5", "seed 6", "seed 7"]


def test_a_short_native_answer_is_topped_up() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        n = json.loads(request.content).get("n", 1)
        return httpx2.Response(
            200, json=completion(["native"] * min(n, 2) if n > 1 else ["single"])
        )

    upstream = Upstream(answer)
    with proxy(upstream, n=4) as client:
        reply = ok(post(client))
        again = ok(post(client))
    assert [b.get("n") for b in upstream.bodies()[:3]] == [4, None, None]
    assert reply["capplug"]["n_received"] == 4
    assert again["capplug"]["native_n"] is True  # two choices back: n works, just fewer


def test_an_upstream_that_refuses_n_is_asked_without_it() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if "n" in json.loads(request.content):
            error = {"message": "n is not supported", "type": "invalid_request_error"}
            return httpx2.Response(400, json={"error": {**error, "param": "n", "code": None}})
        return httpx2.Response(200, json=completion(["single"]))

    upstream = Upstream(answer)
    with proxy(upstream, n=3) as client:
        reply = ok(post(client))
        ok(post(client))
    assert [b.get("n") for b in upstream.bodies()] == [3, None, None, None] + [None] * 3
    assert reply["capplug"]["n_received"] == 3
    assert reply["capplug"]["failures"] == 0 and reply["capplug"]["native_n"] is False


def test_a_request_the_upstream_refuses_is_relayed_as_it_is(sleeps: Sleeps) -> None:
    refusal = {
        "error": {
            "message": "The model 'nope' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    upstream = Upstream(lambda r: httpx2.Response(404, json=refusal))
    with proxy(upstream, n=4, retry=fast_retry(sleeps)) as client:
        response = post(client, {**CHAT, "model": "nope"})
    assert response.status_code == 404
    assert response.json() == refusal
    assert len(upstream.requests) == 1 and sleeps.waits == []  # not retried, no fan-out

    # A 400 about something other than n is relayed at once: one upstream call.
    bad = {"error": {"message": "messages[1] is bad", "type": "invalid_request_error"}}
    upstream = Upstream(lambda r: httpx2.Response(400, json=bad))
    with proxy(upstream, n=4, retry=fast_retry(sleeps)) as client:
        response = post(client)
    assert response.status_code == 400 and response.json() == bad
    assert [b.get("n") for b in upstream.bodies()] == [4]


def test_upstream_log_probabilities_drive_the_choice_when_every_candidate_has_them() -> None:
    from types import SimpleNamespace

    from capplug.selection import Combiner

    weights = Combiner({"logprob+scorer": {"logprob": 2.0, "scorer": 1.0}, "scorer": {"scorer": 1}})
    scorer = LookupScorer({"Lyon": 0.6, "Paris": 0.5})
    scorer.model = SimpleNamespace(config=SimpleNamespace(capplug_selection=weights.to_config()))

    def with_logprobs(values: list[float | None]) -> dict[str, Any]:
        reply = completion(["Lyon", "Paris"])
        for choice, value in zip(reply["choices"], values, strict=True):
            if value is not None:
                choice["logprobs"] = {"content": [{"token": "x", "logprob": value}]}
        return reply

    replies = iter([with_logprobs([-5.0, -0.1]), with_logprobs([None, -0.1])])
    upstream = Upstream(lambda r: httpx2.Response(200, json=next(replies)))
    with proxy(upstream, scorer, n=2) as client:
        sure, unsure = ok(post(client)), ok(post(client))
    assert sure["choices"][0]["message"]["content"] == "Paris"
    assert sure["capplug"]["signals"]["logprob"] == [-5.0, -0.1]
    # One candidate without logprobs: the scorer alone decides, and says so in the weights.
    assert unsure["choices"][0]["message"]["content"] == "Lyon"
    assert unsure["capplug"]["weights"] == {"scorer": 1.0}


def test_logprobs_are_asked_for_dropped_where_refused_and_never_leak_to_the_client() -> None:
    refusal = {"error": {"message": "logprobs is not supported", "param": "logprobs"}}

    def answer(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        if body["model"] == "no-logprobs" and "logprobs" in body:
            return httpx2.Response(400, json=refusal)
        reply = completion(["Lyon", "Paris"])
        if body.get("logprobs"):
            for choice in reply["choices"]:
                choice["logprobs"] = {"content": [{"token": "x", "logprob": -1.0}]}
        return httpx2.Response(200, json=reply)

    from types import SimpleNamespace

    from capplug.selection import Combiner

    # Signals are computed where the weights use them, as on every surface: these use logprob.
    weights = Combiner({"logprob+scorer": {"logprob": 1.0, "scorer": 1.0}, "scorer": {"scorer": 1}})
    scorer = LookupScorer({"Paris": 0.9})
    scorer.model = SimpleNamespace(config=SimpleNamespace(capplug_selection=weights.to_config()))
    upstream = Upstream(answer)
    with proxy(upstream, scorer, n=2) as client:
        plain = ok(post(client))
        asked = ok(post(client, {**CHAT, "logprobs": True}))
        refused = [ok(post(client, {**CHAT, "model": "no-logprobs"})) for _ in range(2)]
    assert plain["choices"][0]["logprobs"] is None  # the client did not ask
    assert plain["capplug"]["signals"]["logprob"] == [-1.0, -1.0]  # but selection used them
    assert asked["choices"][0]["logprobs"]["content"][0]["logprob"] == -1.0
    assert [r["choices"][0]["message"]["content"] for r in refused] == ["Paris", "Paris"]
    sent = [b for b in upstream.bodies() if b["model"] == "no-logprobs"]
    # Refused once, asked again without; the second request does not ask at all.
    assert ["logprobs" in b for b in sent] == [True, False, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_score_is_refused_as_the_selection_core_refuses_it(
    bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    # Not dropped (the choice would silently go to the other signals): refused as choose()
    # refuses it, so the answer goes out unscored, saying why, and counts as a scoring failure.
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Lyon", "Paris"])))
    with proxy(upstream, LookupScorer({"Lyon": bad, "Paris": 0.9}), n=2) as client:
        reply = ok(post(client))
        failures = metric(client, "capplug_proxy_scoring_failures_total")
    meta = reply["capplug"]
    assert meta["scores"] is None and meta["signals"] is None and meta["weights"] is None
    assert "scoring failed" in meta["reason"] and "scores must be finite" in meta["reason"]
    assert reply["choices"][0]["message"]["content"] == "Lyon"  # in the order received
    assert failures == 1 and "scores must be finite" in caplog.text


def test_the_request_n_gets_the_top_n_distinct_answers_first() -> None:
    texts = ["B", "A", "B ", "C", "A"]  # "B " repeats "B" up to whitespace
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(texts)))
    scorer = LookupScorer({"A": 0.5, "B": 0.9, "B ": 0.9, "C": 0.1})
    with proxy(upstream, scorer, n=5) as client:
        reply = ok(post(client, {**CHAT, "n": 4}))
    assert [c["message"]["content"] for c in reply["choices"]] == ["B", "A", "C", "B "]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert reply["capplug"]["returned"] == [0, 1, 3, 2]
    assert reply["capplug"]["signals"]["scorer"] == [0.9, 0.5, 0.9, 0.1, 0.5]
    # Repeats are scored once.
    assert scorer.calls[0][1] == ["B", "A", "C"]


def test_x_capplug_n_sets_the_candidates_per_request() -> None:
    upstream = Upstream()
    with proxy(upstream, n=8) as client:
        assert ok(post(client, headers={"X-Capplug-N": "3"}))["capplug"]["n_requested"] == 3
        # Fewer candidates than the choices asked for: the request's n wins.
        reply = ok(post(client, {**CHAT, "n": 5}, headers={"X-Capplug-N": "2"}))
        assert reply["capplug"]["n_requested"] == 5 and len(reply["choices"]) == 5
        # One candidate: one plain request, still scored.
        single = ok(post(client, headers={"X-Capplug-N": "1"}))
        for value in ("0", "many", "33", "-2"):
            error = error_of(post(client, headers={"X-Capplug-N": value}), 400)
            assert "X-Capplug-N" in error["message"] and error["code"] == "invalid_header"
    assert [b.get("n") for b in upstream.bodies()] == [3, 5, None]
    assert single["capplug"]["upstream_calls"] == 1 and len(single["capplug"]["scores"]) == 1
    assert all("x-capplug-n" not in r.headers for r in upstream.requests)


def test_temperature_zero_is_sampled_so_candidates_can_differ() -> None:
    upstream = Upstream()
    with proxy(upstream, n=2) as client:
        ok(post(client, {**CHAT, "temperature": 0}))
        ok(post(client, {**CHAT, "temperature": 0.3}))
    with proxy(upstream, n=2, sampling_temperature=None) as client:
        ok(post(client, {**CHAT, "temperature": 0}))
    assert [b["temperature"] for b in upstream.bodies()] == [0.8, 0.3, 0]


def test_candidates_with_tool_calls_pass_through_unscored() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}

    def answer(request: httpx2.Request) -> httpx2.Response:
        body = completion(["text only", "", "also text"])
        body["choices"][1]["message"].update(content=None, tool_calls=[call])
        body["choices"][1]["finish_reason"] = "tool_calls"
        return httpx2.Response(200, json=body)

    upstream = Upstream(answer)
    scorer = LookupScorer({"text only": 1.0})
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with proxy(upstream, scorer, n=3) as client:
        # X-Capplug-N asks for candidates although the request offers tools.
        reply = ok(post(client, {**CHAT, "tools": tools}, headers={"X-Capplug-N": "3"}))
    assert upstream.bodies()[0]["tools"] == tools  # forwarded as they came
    choice = reply["choices"][0]
    assert choice["message"]["tool_calls"] == [call] and choice["finish_reason"] == "tool_calls"
    assert reply["capplug"]["scores"] is None and reply["capplug"]["chosen"] == 1
    assert "tool calls" in reply["capplug"]["reason"]
    assert scorer.calls == []


def test_a_request_offering_tools_gets_one_candidate_and_says_why() -> None:
    upstream = Upstream()
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with proxy(upstream, n=4) as client:
        reply = ok(post(client, {**CHAT, "tools": tools, "temperature": 0}))
    (sent,) = upstream.bodies()
    assert "n" not in sent and sent["temperature"] == 0  # one call, the client's temperature
    assert reply["capplug"]["n_requested"] == 1 and "offers tools" in reply["capplug"]["reason"]


# ---------------------------------------------------------------------------- streaming


def _events(response: httpx2.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    data = [b.removeprefix("data: ") for b in blocks]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_stream_sends_the_chosen_answer_as_chunks() -> None:
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Lyon", "Paris is it"])))
    scorer = LookupScorer({"Paris is it": 0.9})
    with proxy(upstream, scorer, n=2) as client:
        plain = ok(post(client))
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        chunks = _events(post(client, body))
    sent = upstream.bodies()[1]
    assert "stream" not in sent and "stream_options" not in sent  # candidates come whole

    *choice_chunks, last = chunks
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {"chatcmpl-up"} and {c["model"] for c in chunks} == {
        "m-2024"
    }
    deltas = [c["choices"][0] for c in choice_chunks]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["delta"].get("content", "") for d in deltas) == "Paris is it"
    assert [d["finish_reason"] for d in deltas] == [None] * (len(deltas) - 1) + ["stop"]
    assert choice_chunks[0]["capplug"]["chosen"] == 1
    assert all(c["usage"] is None for c in choice_chunks)
    assert last["choices"] == [] and last["usage"] == plain["usage"]


def test_openai_sdk_reads_the_reranked_answer_and_stream() -> None:
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Lyon", "Paris"])))
    app = create_proxy_app(
        UPSTREAM,
        scorer=LookupScorer({"Paris": 0.7}),
        n=2,
        transport=upstream.transport(),
    )

    async def scenario() -> tuple[Any, list[Any]]:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
        async with openai.AsyncOpenAI(
            base_url="http://proxy.test/v1", api_key="sk-client", http_client=http, max_retries=0
        ) as client:
            reply = await client.chat.completions.create(model="m", messages=MESSAGES)
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            return reply, [chunk async for chunk in stream]

    reply, chunks = asyncio.run(scenario())
    assert reply.choices[0].message.content == "Paris"
    assert reply.capplug["signals"]["scorer"] == [0.0, 0.7]  # the extra field, as the SDK keeps it
    assert reply.usage is not None and reply.usage.total_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris"
    assert chunks[0].capplug["chosen"] == 1


# ------------------------------------------------------------------------ pass-through


def test_x_capplug_disable_passes_the_request_through_untouched() -> None:
    sse = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'

    def answer(request: httpx2.Request) -> httpx2.Response:
        headers = [
            ("content-type", "text/event-stream"),
            ("x-request-id", "req-7"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("connection", "close"),
        ]
        return httpx2.Response(200, headers=headers, content=sse)

    upstream = Upstream(answer)
    scorer = LookupScorer()
    raw = b'{"model":"m",  "n": 3, "stream": true,\n "messages": [{"role":"user","content":"hi"}]}'
    with proxy(upstream, scorer) as client:
        response = client.post(
            "/v1/chat/completions?api-version=1",
            content=raw,
            headers={
                "content-type": "application/json",
                "authorization": "Bearer sk-client",
                "openai-organization": "org-1",
                "x-capplug-disable": "1",
                "x-capplug-n": "5",
            },
        )
    (sent,) = upstream.requests
    assert sent.content == raw  # byte for byte: n, stream and spacing untouched
    assert str(sent.url) == f"{UPSTREAM}/chat/completions?api-version=1"
    assert sent.headers["authorization"] == "Bearer sk-client"
    assert sent.headers["openai-organization"] == "org-1"
    assert not any(name.lower().startswith("x-capplug") for name in sent.headers)
    assert response.status_code == 200 and response.content == sse
    assert response.headers["x-request-id"] == "req-7"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert "x-capplug-candidates" not in response.headers
    assert "server-timing" not in response.headers
    assert scorer.calls == []


def test_other_paths_pass_through_with_status_and_headers() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/v1/models":
            return httpx2.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        if request.url.path == "/v1/embeddings":
            body = json.loads(request.content)
            return httpx2.Response(201, json={"echo": body}, headers={"x-upstream": "yes"})
        return httpx2.Response(404, json={"error": {"message": "no such thing"}})

    upstream = Upstream(answer)
    with proxy(upstream) as client:
        assert client.get("/v1/models").json() == {"object": "list", "data": [{"id": "m"}]}
        embedded = client.post("/v1/embeddings", json={"input": "hi", "model": "e"})
        assert embedded.status_code == 201 and embedded.headers["x-upstream"] == "yes"
        assert embedded.json() == {"echo": {"input": "hi", "model": "e"}}
        missing = client.delete("/v1/files/file-1?purpose=x")
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "no such thing"
        # Outside /v1 is the proxy's own ground: an OpenAI-style 404, nothing sent upstream.
        error = error_of(client.get("/chat/completions"), 404)
        assert error["code"] == "unknown_url"
    assert [(r.method, str(r.url)) for r in upstream.requests] == [
        ("GET", f"{UPSTREAM}/models"),
        ("POST", f"{UPSTREAM}/embeddings"),
        ("DELETE", f"{UPSTREAM}/files/file-1?purpose=x"),
    ]
    assert upstream.requests[0].content == b""
    assert "transfer-encoding" not in upstream.requests[0].headers


def test_pass_through_failures_are_502_and_504() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused")

    def slow(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("timed out")

    with proxy(Upstream(refuse)) as client:
        error = error_of(client.get("/v1/models"), 502)
        assert error["code"] == "upstream_error"
        assert (
            "http://upstream.test" in error["message"] and "connection refused" in error["message"]
        )
    upstream = Upstream(slow)
    with proxy(upstream) as client:
        assert error_of(client.get("/v1/models"), 504)["code"] == "upstream_timeout"
    assert len(upstream.requests) == 1  # pass-through is never retried


# ----------------------------------------------------------------------------- keys


def test_the_proxy_key_guards_it_and_the_upstream_key_goes_through() -> None:
    upstream = Upstream()
    with proxy(upstream, n=2, api_key="proxy-secret") as client:
        assert error_of(post(client), 401)["code"] == "invalid_api_key"
        assert "X-Capplug-Key" in error_of(client.get("/v1/models"), 401)["message"]
        # The proxy key in Authorization does not open /v1: that header belongs upstream.
        wrong_place = post(client, headers={"Authorization": "Bearer proxy-secret"})
        assert wrong_place.status_code == 401
        wrong = post(client, headers={"X-Capplug-Key": "nope"})
        assert wrong.status_code == 401
        assert upstream.requests == []

        headers = {"X-Capplug-Key": "proxy-secret", "Authorization": "Bearer sk-client"}
        ok(post(client, headers=headers))
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-Capplug-Key": "proxy-secret"}).status_code == 200
        scrape = client.get("/metrics", headers={"Authorization": "Bearer proxy-secret"})
        assert scrape.status_code == 200 and "capplug_proxy_requests_total" in scrape.text
    (sent,) = upstream.requests
    assert sent.headers["authorization"] == "Bearer sk-client"
    assert "x-capplug-key" not in sent.headers


def test_upstream_api_key_replaces_the_clients_authorization() -> None:
    upstream = Upstream(lambda r: httpx2.Response(200, json={"data": []}))
    with proxy(upstream, upstream_api_key="sk-server") as client:
        client.get("/v1/models", headers={"Authorization": "Bearer sk-client"})
        client.get("/v1/models")
    assert [r.headers.get_list("authorization") for r in upstream.requests] == [
        ["Bearer sk-server"],
        ["Bearer sk-server"],
    ]


def test_no_key_is_ever_logged(sleeps: Sleeps, caplog: pytest.LogCaptureFixture) -> None:
    attempts = itertools.count()

    def answer(request: httpx2.Request) -> httpx2.Response:
        if next(attempts) % 2 == 0:
            return httpx2.Response(500, json={"error": {"message": "try again"}})
        return httpx2.Response(200, json=completion(["fine"]))

    caplog.set_level(logging.DEBUG)
    upstream = Upstream(answer)
    headers = {"Authorization": "Bearer sk-very-secret", "X-Capplug-Key": "proxy-very-secret"}
    with proxy(upstream, n=1, api_key="proxy-very-secret", retry=fast_retry(sleeps)) as client:
        ok(post(client, headers=headers))
        client.get("/v1/models", headers=headers)
        post(client, headers={**headers, "X-Capplug-Key": "wrong-very-secret"})
    assert sleeps.waits  # a retry was logged
    assert "attempt 1 of 3 failed" in caplog.text
    assert "very-secret" not in caplog.text


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        (b'{"messages": [', None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"\xff\xfe not utf", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_body"),
        (b"{}", "messages", "missing_required_parameter"),
        (b'{"model": "m"}', "messages", "missing_required_parameter"),
        (b'{"messages": []}', "messages", "invalid_value"),
        (b'{"messages": "hello"}', "messages", "invalid_value"),
        (b'{"messages": [{"content": "hi"}]}', "messages", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "n", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": "2"}', "n", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 33}', "n", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "y"}', "stream", None),
    ],
)
def test_bad_requests_get_openai_errors_and_never_reach_upstream(
    content: bytes, param: str | None, code: str | None
) -> None:
    upstream = Upstream()
    with proxy(upstream) as client:
        response = client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert upstream.requests == []


def test_bad_header_values_are_400() -> None:
    with proxy(Upstream()) as client:
        error = error_of(post(client, headers={"X-Capplug-Disable": "maybe"}), 400)
    assert "X-Capplug-Disable" in error["message"]


def test_oversized_bodies_get_413_streamed_or_not() -> None:
    upstream = Upstream()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as the bytes arrive
        yield b'{"input": "'
        for _ in range(100):
            yield b"y" * 100
        yield b'"}'

    with proxy(upstream, max_body_bytes=4096) as client:
        assert "4096 bytes" in error_of(post(client, big), 413)["message"]
        response = client.post("/v1/embeddings", content=chunked())
        assert "content-length" not in response.request.headers
        assert error_of(response, 413)["code"] == "request_too_large"
        response = client.post(
            "/v1/chat/completions",
            content=chunked(),
            headers={"content-type": "application/json", "x-capplug-disable": "1"},
        )
        error_of(response, 413)
        assert metric(client, "capplug_proxy_requests_total", mode="passthrough", status="413") == 2
    assert all(r.url.path != "/v1/chat/completions" for r in upstream.requests)


def test_retries_honour_retry_after_then_answer(sleeps: Sleeps) -> None:
    script = iter(
        [
            httpx2.Response(
                429, headers={"Retry-After": "7"}, json={"error": {"message": "slow down"}}
            ),
            httpx2.Response(503, json={"error": {"message": "overloaded"}}),
        ]
    )

    def answer(request: httpx2.Request) -> httpx2.Response:
        return next(script, None) or httpx2.Response(200, json=completion(["a", "b"]))

    upstream = Upstream(answer)
    with proxy(upstream, n=2, retry=fast_retry(sleeps, attempts=5)) as client:
        reply = ok(post(client))
        assert metric(client, "capplug_proxy_upstream_retries_total", reason="429") == 1
        assert metric(client, "capplug_proxy_upstream_retries_total", reason="503") == 1
        assert metric(client, "capplug_proxy_upstream_requests_total", mode="rerank") == 3
    assert len(upstream.requests) == 3
    assert sleeps.waits[0] == 7  # the server's Retry-After, not the (zero) backoff
    assert reply["capplug"]["n_received"] == 2 and reply["capplug"]["failures"] == 0


@pytest.mark.parametrize(
    ("fault", "status", "code", "reason", "label"),
    [
        (
            lambda: httpx2.Response(500, json={"error": {"message": "boom"}}),
            502,
            "upstream_error",
            "upstream answered 500: boom",
            "500",
        ),
        (
            lambda: httpx2.Response(429, headers={"Retry-After": "2"}, text="busy"),
            429,
            "rate_limit_exceeded",
            "upstream answered 429: busy",
            "429",
        ),
        (
            httpx2.ReadTimeout("timed out"),
            504,
            "upstream_timeout",
            "ReadTimeout: timed out",
            "timeout",
        ),
        (
            httpx2.ConnectError("connection refused"),
            502,
            "upstream_error",
            "ConnectError: connection refused",
            "connection",
        ),
        (
            httpx2.RemoteProtocolError("server disconnected"),
            502,
            "upstream_error",
            "RemoteProtocolError: server disconnected",
            "connection",
        ),
    ],
)
def test_upstream_failures_after_bounded_retries(
    sleeps: Sleeps, fault: Any, status: int, code: str, reason: str, label: str
) -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if isinstance(fault, Exception):
            raise fault
        return fault()

    upstream = Upstream(answer)
    with proxy(upstream, n=4, retry=fast_retry(sleeps, attempts=3)) as client:
        response = post(client)
        error = error_of(response, status)
        assert metric(client, "capplug_proxy_upstream_failures_total", reason=label) == 1
        assert metric(client, "capplug_proxy_upstream_retries_total", reason=label) == 2
        assert (
            metric(client, "capplug_proxy_requests_total", mode="rerank", status=str(status)) == 1
        )
    kind = "rate_limit_error" if status == 429 else "server_error"
    assert error["code"] == code and error["type"] == kind
    assert error["message"] == (
        f"the upstream http://upstream.test failed after 3 attempts: {reason}"
    )
    assert len(upstream.requests) == 3  # the native request, tried 3 times; no fan-out after
    assert response.headers.get("retry-after") == ("2" if label == "429" else None)


def test_a_garbage_body_is_a_502_at_once(sleeps: Sleeps) -> None:
    for body in (b"<html>oops</html>", b'{"object": "chat.completion", "choices": []}', b"[]"):
        upstream = Upstream(lambda r, body=body: httpx2.Response(200, content=body))
        with proxy(upstream, n=3, retry=fast_retry(sleeps)) as client:
            error = error_of(post(client), 502)
        assert "not a chat completion" in error["message"] or "not JSON" in error["message"]
        assert "failed after 1 attempt:" in error["message"]
        assert len(upstream.requests) == 1
    assert sleeps.waits == []


def test_failed_candidates_are_counted_and_the_rest_still_answer(sleeps: Sleeps) -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        # The first two requests to arrive succeed and everything after fails, so of the three
        # single requests one fails on each of its three attempts.
        index = len(upstream.requests) - 1
        if index < 2:
            return httpx2.Response(200, json=completion([f"fine {index}"]))
        return httpx2.Response(500, json={"error": {"message": "boom"}})

    upstream = Upstream(answer)
    with proxy(upstream, n=3, native_n="never", retry=fast_retry(sleeps, attempts=3)) as client:
        reply = ok(post(client))
        assert metric(client, "capplug_proxy_candidate_failures_total") == 1
        assert metric(client, "capplug_proxy_candidates_total") == 2
        assert metric(client, "capplug_proxy_upstream_failures_total", reason="500") == 1
    meta = reply["capplug"]
    assert meta["n_requested"] == 3 and meta["n_received"] == 2 and meta["failures"] == 1
    assert meta["errors"] == ["upstream answered 500: boom"]
    assert len(meta["scores"]) == 2 and meta["upstream_calls"] == 3
    assert len(upstream.requests) == 5  # 2 good calls + 1 call tried 3 times
    assert reply["usage"]["prompt_tokens"] == 20  # failed attempts report no usage
    assert all("n" not in body for body in upstream.bodies())


def test_no_request_is_lost_or_answered_twice_through_a_flaky_upstream() -> None:
    rng = random.Random(7)
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    async def answer(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        key = body["messages"][-1]["content"]
        with lock:
            attempts[key] = attempts.get(key, 0) + 1
        await asyncio.sleep(rng.random() / 100)
        fault = rng.random()
        if fault < 0.15:
            return httpx2.Response(429, headers={"Retry-After": "0"}, text="busy")
        if fault < 0.3:
            return httpx2.Response(500, text="boom")
        if fault < 0.4:
            raise httpx2.ReadTimeout("timed out")
        if fault < 0.45:
            raise httpx2.RemoteProtocolError("dropped")
        n = body.get("n", 1)
        return httpx2.Response(200, json=completion([f"{key} #{k}" for k in range(n)]))

    upstream = Upstream(answer)
    app = create_proxy_app(
        UPSTREAM,
        scorer=LookupScorer(),
        n=3,
        retry=fast_retry(Sleeps(), attempts=3),
        transport=upstream.transport(),
    )
    keys = [f"request {i}" for i in range(40)]

    async def scenario() -> list[httpx2.Response]:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://proxy.test") as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": key}]},
                    )
                    for key in keys
                )
            )

    responses = asyncio.run(scenario())
    answered = 0
    for key, response in zip(keys, responses, strict=True):
        assert response.status_code in (200, 429, 502, 504), response.text
        if response.status_code == 200:
            answered += 1
            (choice,) = response.json()["choices"]
            assert choice["message"]["content"].startswith(f"{key} #")  # its own answer
            assert attempts[key] <= 3
        else:
            assert attempts[key] == 3  # given up only once the attempts ran out
    assert answered >= 25  # the retries carried most requests through
    assert sum(attempts.values()) == len(upstream.requests)


# ---------------------------------------------------------------------------- scoring


class SlowScorer:
    """A pair scorer that takes 0.2 s per call and records threads and batch sizes."""

    def __init__(self, poison: str | None = None) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.poison = poison

    def _check(self, responses: list[str]) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(0.2)
        if self.poison is not None and any(self.poison in r for r in responses):
            raise RuntimeError("the scorer choked")

    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        self.batches.append(len(responses))
        self._check(responses)
        return [len(r) / 100 for r in responses]

    def score_pairs(self, pairs: list[tuple[Any, str]]) -> list[float]:
        self.batches.append(len(pairs))
        self._check([r for _, r in pairs])
        return [len(r) / 100 for _, r in pairs]


def _concurrently(app: Any, bodies: list[dict[str, Any]]) -> tuple[list[httpx2.Response], float]:
    """Send the first body, then the rest 50 ms later (while the first is being scored), then
    ask /healthz; returns the responses and how long /healthz took."""

    async def scenario() -> tuple[list[httpx2.Response], float]:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://proxy.test") as http:
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=bodies[0]))
            await asyncio.sleep(0.05)
            rest = asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in bodies[1:]))
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            health = await http.get("/healthz")
            health_seconds = time.perf_counter() - start
            assert health.status_code == 200
            return [await first, *await rest], health_seconds

    return asyncio.run(scenario())


def test_scoring_runs_off_the_event_loop_and_batches_waiting_requests() -> None:
    scorer = SlowScorer()
    upstream = Upstream()
    app = create_proxy_app(UPSTREAM, scorer=scorer, n=2, transport=upstream.transport())
    responses, health_seconds = _concurrently(app, [CHAT] * 4)
    assert [r.status_code for r in responses] == [200] * 4
    assert health_seconds < 0.15  # the loop answered while the scorer was busy
    assert threading.main_thread().name not in scorer.threads
    assert scorer.threads == {"capplug-scoring-small"}  # the lane for small requests
    # The first request's candidates are scored alone; the three that came while the scorer was
    # busy share the next batch, and waited for the first.
    assert scorer.batches == [2, 6]
    waited = [server_timing(r)["scoring"] for r in responses]
    assert waited[0] < 300 and min(waited[1:]) >= 300


def test_a_failing_scorer_answers_unscored_without_failing_its_batch_mates() -> None:
    upstream = Upstream(
        lambda r: httpx2.Response(
            200, json=completion([json.loads(r.content)["messages"][0]["content"], "other"])
        )
    )
    scorer = SlowScorer(poison="poison")
    app = create_proxy_app(UPSTREAM, scorer=scorer, n=2, transport=upstream.transport())
    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": text}]}
        for text in ("first", "second", "poison")
    ]
    responses, _ = _concurrently(app, bodies)
    metas = [r.json()["capplug"] for r in responses]
    assert [r.status_code for r in responses] == [200] * 3
    assert metas[0]["scores"] is not None and metas[1]["scores"] is not None
    assert metas[2]["scores"] is None and "scoring failed" in metas[2]["reason"]
    assert "the scorer choked" in metas[2]["reason"]
    assert responses[2].json()["choices"][0]["message"]["content"] == "poison"  # as received
    # "second" and "poison" waited together; their shared batch failed, so each was scored alone.
    assert scorer.batches == [2, 4, 2, 2]


# ---------------------------------------------------------------------------- metrics


def test_metrics_count_requests_candidates_and_time(sleeps: Sleeps) -> None:
    upstream = Upstream()
    with proxy(upstream, n=3, retry=fast_retry(sleeps)) as client:
        ok(post(client))
        ok(post(client))
        client.get("/v1/models")
        post(client, {"model": "m"})
        assert metric(client, "capplug_proxy_requests_total", mode="rerank", status="200") == 2
        assert metric(client, "capplug_proxy_requests_total", mode="rerank", status="400") == 1
        assert metric(client, "capplug_proxy_requests_total", mode="passthrough", status="200") == 1
        assert metric(client, "capplug_proxy_candidates_total") == 6
        assert metric(client, "capplug_proxy_scoring_seconds_count") == 2
        assert metric(client, "capplug_proxy_upstream_seconds_count") == 2
        assert metric(client, "capplug_proxy_request_seconds_count", mode="rerank") == 3
        assert metric(client, "capplug_proxy_requests_in_flight") == 0
        assert metric(client, "capplug_proxy_upstream_requests_total", mode="passthrough") == 1
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")


# ---------------------------------------------------------------------------- options


def test_create_proxy_app_checks_its_options() -> None:
    scorer = LookupScorer()
    with pytest.raises(ValueError, match="http:// or https://"):
        create_proxy_app("upstream.test/v1", scorer=scorer)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        create_proxy_app(UPSTREAM, scorer=scorer, n=0)
    with pytest.raises(ValueError, match="at most max_n"):
        create_proxy_app(UPSTREAM, scorer=scorer, n=9, max_n=8)
    with pytest.raises(ValueError, match="native_n"):
        create_proxy_app(UPSTREAM, scorer=scorer, native_n="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        create_proxy_app(UPSTREAM, scorer=scorer, timeout=0)
    with pytest.raises(ValueError, match="api_key"):
        create_proxy_app(UPSTREAM, scorer=scorer, api_key="")
    with pytest.raises(TypeError, match="scorer must be"):
        create_proxy_app(UPSTREAM, scorer=42)


def test_a_scorer_reference_is_loaded(tiny_bert_scorer: Path) -> None:
    upstream = Upstream()
    app = create_proxy_app(
        UPSTREAM, scorer=str(tiny_bert_scorer), n=2, transport=upstream.transport()
    )
    with TestClient(app) as client:
        scores = ok(post(client))["capplug"]["scores"]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)


# -------------------------------------------------------------------------------- CLI


def test_cli_proxy_runs_uvicorn_with_the_proxy(
    tiny_bert_scorer: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    monkeypatch.delenv("CAPPLUG_API_KEY", raising=False)
    code = main(
        [
            "proxy",
            "--upstream",
            "http://127.0.0.1:9/v1",
            "--scorer",
            str(tiny_bert_scorer),
            "--n",
            "4",
        ]
    )
    assert code == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8787
    with TestClient(seen["app"]) as served:
        assert served.get("/healthz").json() == {"status": "ok"}
    err = capsys.readouterr().err
    assert "http://127.0.0.1:8787/v1" in err and "best of 4" in err


def test_cli_proxy_wants_a_key_off_loopback_and_checks_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CAPPLUG_API_KEY", raising=False)
    assert main(["proxy", "--upstream", UPSTREAM, "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    # Options are checked before the scorer loads: these fail at once.
    assert main(["proxy", "--upstream", "ftp://x/v1"]) == 2
    assert "http:// or https://" in capsys.readouterr().err
    assert main(["proxy", "--upstream", UPSTREAM, "--n", "0"]) == 2
    assert "n must be an integer >= 1" in capsys.readouterr().err
    assert main(["proxy", "--upstream", UPSTREAM, "--max-attempts", "0"]) == 2
    assert "max_attempts" in capsys.readouterr().err


def test_cli_proxy_names_the_missing_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["proxy", "--upstream", UPSTREAM]) == 2
    assert "pip install 'capplug[serve]'" in capsys.readouterr().err


def test_a_quirk_needs_repeated_evidence_is_probed_and_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    quirks = Quirks("u", "fanning out", seconds=600, sightings=3, probe_seconds=60,
                    clock=lambda: now[0])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="capplug.serve.proxy"):
        quirks.remember("m", "answered with one choice")
        now[0] = 700.0  # the first sighting has run out of the window
        quirks.remember("m", "answered with one choice")
        quirks.remember("m", "answered with one choice")
        assert "m" not in quirks and len(quirks) == 0  # two sightings in the window
        quirks.remember("m", "answered with one choice")
        assert "m" in quirks and len(quirks) == 1
        now[0] = 770.0  # a minute on: one request probes, the next ones still fan out
        assert "m" not in quirks
        assert "m" in quirks
        quirks.forget("m")  # the probe was answered in full
        assert "m" not in quirks and len(quirks) == 0
        quirks.remember("x", "refused n", conclusive=True)
        assert "x" in quirks
        now[0] = 1400.0
        assert "x" not in quirks  # believed for 600 s only
    messages = [r.getMessage() for r in caplog.records]
    assert sum("for the next 600 s" in m for m in messages) == 2
    assert any("supports it again for model 'm'" in m for m in messages)
