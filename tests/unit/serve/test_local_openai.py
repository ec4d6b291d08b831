"""The OpenAI-compatible local server on a tiny random Llama, called in-process (no sockets)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from capplug.cli import main
from capplug.llms import LocalChatModel, SamplingRecipe, SamplingStrategy
from capplug.serve import create_app
from capplug.testing import save_tiny_llama as _save_tiny_llama

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-serve"))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LocalChatModel:
    # float64: greedy decoding through generate() and through the server pick the same tokens.
    return LocalChatModel.from_pretrained(tiny_llama_dir, device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def client(llm: LocalChatModel) -> Iterator[TestClient]:
    app = create_app(llm, model_name="tiny", max_body_bytes=4096, max_n=4, max_tokens_cap=16)
    with TestClient(app) as test_client:
        yield test_client


def _complete(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _events(response: httpx2.Response) -> list[Any]:
    """The data of each server-sent event: parsed JSON chunks, then the literal ``[DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    data = [b.removeprefix("data: ") for b in blocks]
    return [json.loads(d) for d in data[:-1]] + [data[-1]]


def _error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- metadata


def test_lists_the_served_model(client: TestClient) -> None:
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    assert listing["data"][0]["object"] == "model"
    assert client.get("/v1/models/tiny").json() == listing["data"][0]
    error = _error(client.get("/v1/models/gpt-4o"), 404)
    assert error["code"] == "model_not_found"
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny"}


# ---------------------------------------------------------------------------- completions


def test_returns_n_sampled_choices_with_usage(client: TestClient, llm: LocalChatModel) -> None:
    reply = _complete(client, n=3, temperature=0.8, max_tokens=6, seed=7)
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")
    assert reply["model"] == "tiny"
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" for c in reply["choices"])

    # The choices are the model's own candidates for the same recipe and seed, mapped 1:1.
    recipe = SamplingRecipe(strategies=(SamplingStrategy(n=3, temperature=0.8),), max_new_tokens=6)
    (expected,) = llm.sample_candidates([MESSAGES], recipe=recipe, seed=7, progress=False)
    assert [c["message"]["content"] for c in reply["choices"]] == [c.text for c in expected]
    assert [c["finish_reason"] for c in reply["choices"]] == [
        "stop" if c.finished else "length" for c in expected
    ]

    prompt_ids = llm.tokenizer(llm.render(MESSAGES), add_special_tokens=False)["input_ids"]
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == sum(c.n_tokens for c in expected)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_same_seed_same_choices_other_seed_other_choices(client: TestClient) -> None:
    def texts(seed: int) -> list[str]:
        reply = _complete(client, n=4, temperature=1.0, max_tokens=8, seed=seed)
        return [c["message"]["content"] for c in reply["choices"]]

    first = texts(1)
    assert texts(1) == first
    assert texts(2) != first
    assert len(set(first)) > 1  # sampled choices differ from one another


def test_max_tokens_cuts_choices_with_finish_reason_length(client: TestClient) -> None:
    reply = _complete(client, n=4, temperature=1.0, max_completion_tokens=1, seed=0)
    for choice in reply["choices"]:
        # One token: either the end-of-turn token straight away, or a cut reply.
        assert choice["finish_reason"] == (
            "stop" if choice["message"]["content"] == "" else "length"
        )
    assert reply["usage"]["completion_tokens"] == 4
    assert any(c["finish_reason"] == "length" for c in reply["choices"])


def test_temperature_zero_is_greedy_decoding(client: TestClient, llm: LocalChatModel) -> None:
    (greedy,) = llm.generate([MESSAGES], max_new_tokens=10)
    reply = _complete(client, n=2, temperature=0, max_tokens=10)
    assert [c["message"]["content"] for c in reply["choices"]] == [greedy, greedy]
    # No sampling option at all and n=1 decodes greedily too, whatever the seed.
    plain = _complete(client, max_tokens=10, seed=123)
    assert plain["choices"][0]["message"]["content"] == greedy


def test_stop_sequence_cuts_the_reply(client: TestClient) -> None:
    request = {"n": 4, "temperature": 1.0, "max_tokens": 16, "seed": 5}
    full = _complete(client, **request)["choices"]
    longest = max((c["message"]["content"] for c in full), key=len)
    assert len(longest) >= 4, "the seed should give a reply long enough to cut"
    stop = longest[2:4]
    cut = _complete(client, **request, stop=stop)["choices"]
    for before, after in zip(full, cut, strict=True):
        text = before["message"]["content"]
        if stop in text:
            assert after["message"]["content"] == text[: text.find(stop)]
            assert after["finish_reason"] == "stop"
        else:
            assert after == before


def test_accepts_openai_extras_and_content_parts(client: TestClient) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital?"}]}]
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",  # any name: the server answers with its own model
            "messages": [{"role": "developer", "content": "Be brief."}, *parts],
            "max_tokens": 4,
            "presence_penalty": 0.0,
            "user": "someone",
            "n": None,
            "stream": False,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny"


# ------------------------------------------------------------------------------ streaming


def test_streams_chunks_then_done(client: TestClient) -> None:
    body = {"messages": MESSAGES, "n": 2, "temperature": 0.9, "max_tokens": 8, "seed": 3}
    plain = _complete(client, **{k: v for k, v in body.items() if k != "messages"})
    events = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == "tiny" and "usage" not in c for c in chunks)
    for index, choice in enumerate(plain["choices"]):
        deltas = [ch for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(d["finish_reason"] is None for d in deltas[:-1])
        assert deltas[-1]["finish_reason"] == choice["finish_reason"]
        streamed = "".join(d["delta"].get("content", "") for d in deltas)
        assert streamed == choice["message"]["content"]


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.9, "seed": 5}], ids=["greedy", "sampled"]
)
def test_one_choice_streams_token_by_token_and_matches_the_plain_reply(
    client: TestClient, sampling: dict
) -> None:
    body = {"max_tokens": 8, "logprobs": True, **sampling}
    plain = _complete(client, **body)["choices"][0]
    events = _events(
        client.post(
            "/v1/chat/completions",
            json={
                "messages": MESSAGES,
                **body,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    )
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    deltas = [ch for c in chunks for ch in c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [d["delta"]["content"] for d in deltas[1:-1]]
    assert "".join(pieces) == plain["message"]["content"]
    if len(plain["message"]["content"].split()) > 2:
        assert len(pieces) > 2  # tokens as they come, not the whole reply at the end
    assert deltas[-1]["finish_reason"] == plain["finish_reason"]
    assert deltas[-1]["logprobs"] == plain["logprobs"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def test_stream_usage_comes_last_when_asked(client: TestClient) -> None:
    body = {"n": 2, "temperature": 0.9, "max_tokens": 8, "seed": 4}
    plain = _complete(client, **body)
    events = _events(
        client.post(
            "/v1/chat/completions",
            json={
                "messages": MESSAGES,
                **body,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    )
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert last["choices"] == [] and last["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        (b'{"messages": [', None, "invalid_json"),
        (b"not json at all", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_body"),
        (b"{}", "messages", "missing_required_parameter"),
        (b'{"model": "tiny"}', "messages", "missing_required_parameter"),
        (b'{"messages": []}', "messages", "invalid_value"),
        (b'{"messages": "hello"}', "messages", "invalid_value"),
        (b'{"messages": [{"content": "hi"}]}', "messages[0].role", "missing_required_parameter"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role", None),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", None),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "messages[0].content",
            None,
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 5}', "n", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "n", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": "2"}', "n", "invalid_value"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}',
            "max_tokens",
            None,
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}',
            "temperature",
            None,
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p", None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [""]}', "stop", None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream", None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}', "tools", None),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 2}',
            "top_logprobs",
            None,
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}',
            "logprobs",
            None,
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    client: TestClient, content: bytes, param: str | None, code: str | None
) -> None:
    response = client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    error = _error(response, 400)
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_logprobs_come_back_in_openai_schema_and_sum_to_the_candidates(
    client: TestClient, llm: LocalChatModel
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "n": 2,
        "temperature": 0.9,
        "seed": 3,
        "max_tokens": 12,
        "logprobs": True,
    }
    reply = client.post("/v1/chat/completions", json=body).json()
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False}).json()
    for choice, other in zip(reply["choices"], plain["choices"], strict=True):
        content = choice["logprobs"]["content"]
        assert content and all(
            isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in content
        )
        assert all(t["top_logprobs"] == [] and isinstance(t["bytes"], list) for t in content)
        assert choice["message"]["content"] == other["message"]["content"]  # same draw
        assert other["logprobs"] is None
    # What the selection core reads from them: a sum and a token count per candidate.
    from capplug.selection import openai_logprobs

    total, count = openai_logprobs(reply["choices"][0]["logprobs"])
    assert count == len(reply["choices"][0]["logprobs"]["content"]) and total < 0


def test_too_long_a_prompt_is_a_400_not_a_truncation(client: TestClient) -> None:
    # The tiny model has 256 positions; 120 words and 16 new tokens do not fit.
    long = [{"role": "user", "content": "cat " * 120}]
    response = client.post("/v1/chat/completions", json={"messages": long, "max_tokens": 16})
    error = _error(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"


def test_oversized_bodies_get_413(client: TestClient) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    error = _error(client.post("/v1/chat/completions", json=big), 413)
    assert "4096 bytes" in error["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit counts bytes as they come
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 100
        yield b'"}]}'

    response = client.post(
        "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    _error(response, 413)


def test_unknown_routes_and_methods(client: TestClient) -> None:
    error = _error(client.post("/v1/completions", json={"prompt": "hi"}), 404)
    assert error["message"] == "Invalid URL (POST /v1/completions)"
    _error(client.get("/v1/chat/completions"), 405)


def test_api_key_guards_the_v1_routes(llm: LocalChatModel) -> None:
    with TestClient(create_app(llm, model_name="tiny", api_key="s3cret")) as guarded:
        assert _error(guarded.get("/v1/models"), 401)["code"] == "invalid_api_key"
        wrong = guarded.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = guarded.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert guarded.get("/healthz").status_code == 200


def test_create_app_checks_its_options(llm: LocalChatModel) -> None:
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        create_app(llm, max_n=0)
    with pytest.raises(TypeError, match="LocalChatModel"):
        create_app("smollm2")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- concurrency


def test_generation_runs_off_the_event_loop_one_at_a_time(
    llm: LocalChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    active, most, worker_threads = 0, 0, set()
    guard = threading.Lock()
    real = llm.sample_candidates

    def slow(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        worker_threads.add(threading.current_thread().name)
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                active -= 1

    monkeypatch.setattr(llm, "sample_candidates", slow)
    app = create_app(llm, model_name="tiny")

    async def scenario() -> tuple[list[int], float, float]:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"messages": MESSAGES, "max_tokens": 4}
            start = time.perf_counter()
            completions = asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(3))
            )
            await asyncio.sleep(0.05)
            health = await http.get("/healthz")
            health_at = time.perf_counter() - start
            responses = await completions
            done_at = time.perf_counter() - start
            assert health.status_code == 200
            return [r.status_code for r in responses], health_at, done_at

    statuses, health_at, done_at = asyncio.run(scenario())
    assert statuses == [200, 200, 200]
    assert most == 1  # never two generations at once
    assert done_at >= 0.6  # three 0.2 s generations, one after another
    assert health_at < 0.2  # the event loop answered while a generation ran
    assert threading.main_thread().name not in worker_threads


# ------------------------------------------------------------------------------------ CLI


def test_cli_serve_local_runs_uvicorn_with_the_app(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    monkeypatch.delenv("CAPPLUG_API_KEY", raising=False)
    code = main(
        ["serve", "local", "--model", str(tiny_llama_dir), "--name", "tiny", "--port", "8123"]
    )
    assert code == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    with TestClient(seen["app"]) as served:
        assert served.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert "http://127.0.0.1:8123/v1" in capsys.readouterr().err


def test_cli_serve_local_wants_a_key_off_loopback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CAPPLUG_API_KEY", raising=False)
    assert main(["serve", "local", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_cli_serve_local_names_the_missing_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve", "local"]) == 2
    assert "pip install 'capplug[serve]'" in capsys.readouterr().err
