"""End to end: ChatOpenAI against capplug's OpenAI-compatible server with the packaged SmolLM2,
through CappyBestOfN and the agent middleware, scored by capplug's default scorer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from langchain.agents import create_agent
from langchain_openai import ChatOpenAI

from capplug import Scorer
from capplug.llms import LocalChatModel
from capplug.serve import create_app, serve_in_thread
from langchain_capplug import CappyBestOfN, CappyBestOfNMiddleware, CappyScoreCallbackHandler

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."


class CountingApp:
    """The server's ASGI app, counting chat-completion requests and the `n` each asked for."""

    def __init__(self, app) -> None:
        self.app = app
        self.requests = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            self.requests += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, CountingApp]]:
    model = LocalChatModel.from_pretrained(MODEL, device="cpu")
    app = CountingApp(create_app(model, model_name=MODEL))
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer()


def chat(url: str, **settings) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key="local",
        temperature=0,
        max_tokens=24,
        timeout=120,
        **settings,
    )


def test_best_of_n_through_chat_openai(server, scorer):
    url, app = server
    before = app.requests
    # The server derives each choice's generator from the request's seed: without one, four
    # samples of a one-line answer from a small model are now and then all the same.
    best = CappyBestOfN(llm=chat(url, seed=0), scorer=scorer, n=4)
    reply = best.invoke(QUESTION)
    meta = reply.response_metadata["capplug"]
    assert app.requests - before == 1  # native n: one request for all four candidates
    assert meta["n_requested"] == 4 and meta["n_received"] == 4 and meta["failures"] == 0
    assert len(meta["candidates"]) >= 2  # sampled at temperature 0.8, so they differ
    assert reply.content == meta["candidates"][meta["chosen"]]
    signal = scorer.score(QUESTION, meta["candidates"])
    # The same scores, up to bfloat16's rounding where the scorer runs at it (a pair's score
    # moves by about 1e-4 with the batch it lands in).
    assert meta["signals"]["scorer"] == pytest.approx(signal, abs=1e-3)
    # CappyBestOfN asked the server for log-probabilities, and the selector used them.
    assert len(meta["signals"]["logprob"]) == 4 and all(v < 0 for v in meta["signals"]["logprob"])
    assert "logprob" in meta["weights"]
    assert reply.response_metadata.get("logprobs")  # as ChatOpenAI reports them


def test_best_of_n_leaves_logprobs_alone_when_told(server, scorer):
    url, _ = server
    best = CappyBestOfN(llm=chat(url, seed=0), scorer=scorer, n=4, request_logprobs=False)
    meta = best.invoke(QUESTION).response_metadata["capplug"]
    assert "logprob" not in meta["signals"]


def test_async_best_of_n_and_the_callback_handler(server, scorer):
    url, _ = server
    records = []
    best = CappyBestOfN(llm=chat(url), scorer=scorer, n=3)
    handler = CappyScoreCallbackHandler(scorer=scorer, sink=records)
    reply = asyncio.run(best.ainvoke(QUESTION, config={"callbacks": [handler]}))
    assert reply.response_metadata["capplug"]["n_received"] == 3
    # the handler saw the inner three-choice run and the outer best-of-n run
    inner = [r for r in records if len(r.responses) == 3]
    assert inner and inner[0].fused[inner[0].best] == max(inner[0].fused)
    assert len(inner[0].scores) == 3 and sum(inner[0].fused) == pytest.approx(1.0, abs=1e-4)


def test_agent_middleware_over_the_local_server(server, scorer):
    url, app = server
    before = app.requests
    agent = create_agent(
        chat(url),
        system_prompt="You are a concise assistant.",
        middleware=[CappyBestOfNMiddleware(scorer=scorer, n=3)],
    )
    state = agent.invoke({"messages": [{"role": "user", "content": QUESTION}]})
    answer = state["messages"][-1]
    meta = answer.response_metadata["capplug"]
    assert app.requests - before == 3
    assert meta["n_received"] == 3 and answer.content == answer.text
    assert answer.content.strip()
