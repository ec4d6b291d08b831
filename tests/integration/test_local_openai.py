"""The packaged SmolLM2 behind capplug's OpenAI-compatible server, called by real clients."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI

from capplug.llms import LocalChatModel
from capplug.serve import create_app, serve_in_thread

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    model = LocalChatModel.from_pretrained(MODEL, device="cpu")
    with serve_in_thread(create_app(model, model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_openai_sdk_lists_the_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_sdk_gets_n_sampled_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, n=3, temperature=0.8, max_tokens=16, seed=0
    )
    assert reply.model == MODEL
    assert len(reply.choices) == 3
    texts = [c.message.content for c in reply.choices]
    assert all(texts) and len(set(texts)) > 1  # real answers, and sampling varies them
    assert {c.finish_reason for c in reply.choices} <= {"stop", "length"}
    usage = reply.usage
    assert usage is not None
    assert 10 < usage.prompt_tokens < 100
    assert 3 <= usage.completion_tokens <= 3 * 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_sdk_streams_the_greedy_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    text = "".join(pieces)
    assert "Paris" in text
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens <= 12
    # Streaming changes the transport, not the answer.
    plain = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=12
    )
    assert plain.choices[0].message.content == text


def test_openai_sdk_sees_bad_requests_as_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=100)
    assert caught.value.status_code == 400
    assert caught.value.param == "n"


def test_langchain_chat_openai_talks_to_it(base_url: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        base_url=f"{base_url}/v1", api_key="x", model=MODEL, temperature=0, max_tokens=12
    )
    message = chat.invoke("What is the capital of France?")
    assert "Paris" in message.content
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] <= 12


def test_serve_in_thread_frees_its_port_on_exit() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        assert httpx.get(f"{url}/ping").json() == {"pong": "yes"}
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
