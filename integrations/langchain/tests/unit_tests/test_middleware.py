"""CappyBestOfNMiddleware inside real create_agent loops, sync and async."""

from __future__ import annotations

import asyncio

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from capplug.selection import METADATA_KEYS
from langchain_capplug import CappyBestOfNMiddleware

from .fakes import KeywordScorer, Script, SingleChatModel


@tool
def lookup(city: str) -> str:
    """Look up facts about a city."""
    return f"{city} is the capital of France."


def tool_call(city: str = "Paris") -> AIMessage:
    return AIMessage(
        content="", tool_calls=[{"name": "lookup", "args": {"city": city}, "id": "call-1"}]
    )


def test_each_final_step_samples_n_and_keeps_the_best():
    script = Script(["Lyon.", "London.", "Paris.", "Marseille."])
    agent = create_agent(
        SingleChatModel(script=script),
        middleware=[CappyBestOfNMiddleware(scorer=KeywordScorer(), n=4, max_concurrency=1)],
    )
    state = agent.invoke({"messages": [{"role": "user", "content": "Capital of France?"}]})
    answer = state["messages"][-1]
    assert answer.content == "Paris."
    assert len(script.calls) == 4 and all(c["temperature"] == 0.8 for c in script.calls)
    meta = answer.response_metadata["capplug"]
    assert meta["n_received"] == 4 and meta["candidates"][meta["chosen"]] == "Paris."
    assert meta["upstream_calls"] == 4 and meta["native_n"] is False
    assert set(meta) == set(METADATA_KEYS)  # the schema the proxy and CappyBestOfN report


def test_tool_calling_steps_are_left_alone():
    script = Script([tool_call(), "Lyon.", "Paris.", "London."])
    scorer = KeywordScorer()
    agent = create_agent(
        SingleChatModel(script=script),
        tools=[lookup],
        middleware=[CappyBestOfNMiddleware(scorer=scorer, n=3, max_concurrency=1)],
    )
    state = agent.invoke({"messages": [{"role": "user", "content": "Capital of France?"}]})
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert "capplug" not in state["messages"][1].response_metadata
    assert isinstance(state["messages"][2], ToolMessage)
    assert state["messages"][-1].content == "Paris."
    assert len(script.calls) == 1 + 3  # one call for the tool step, three for the answer
    # The step's candidates were scored against the conversation, the tool's answer included.
    assert len(scorer.calls) == 1 and "\ntool: " in scorer.calls[0][0]


def test_async_agent_loop():
    script = Script(["Lyon.", "Paris.", "London."])
    agent = create_agent(
        SingleChatModel(script=script),
        system_prompt="Answer in one word.",
        middleware=[CappyBestOfNMiddleware(scorer=KeywordScorer(), n=3, max_concurrency=1)],
    )
    state = asyncio.run(
        agent.ainvoke({"messages": [{"role": "user", "content": "Capital of France?"}]})
    )
    assert state["messages"][-1].content == "Paris."
    assert len(script.calls) == 3


class FirstCallOnly(SingleChatModel):
    """Answers its first call; every later call fails."""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        if self.script.calls:
            self.script.calls.append(kwargs)
            raise ValueError("sample lost")
        return super()._generate(messages, stop, run_manager, **kwargs)


def test_failed_samples_are_tolerated_down_to_min_candidates():
    script = Script(["Paris."])
    middleware = CappyBestOfNMiddleware(scorer=KeywordScorer(), n=3, max_concurrency=1)
    agent = create_agent(FirstCallOnly(script=script), middleware=[middleware])
    state = agent.invoke({"messages": [{"role": "user", "content": "Capital of France?"}]})
    meta = state["messages"][-1].response_metadata["capplug"]
    assert state["messages"][-1].content == "Paris."
    assert meta["n_received"] == 1 and meta["failures"] == 2
    assert "sample lost" in meta["errors"][0]

    strict = CappyBestOfNMiddleware(scorer=KeywordScorer(), n=3, min_candidates=2)
    agent = create_agent(FirstCallOnly(script=Script(["Paris."])), middleware=[strict])
    with pytest.raises(ValueError, match="sample lost"):
        agent.invoke({"messages": [{"role": "user", "content": "Capital of France?"}]})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="n must"):
        CappyBestOfNMiddleware(scorer=KeywordScorer(), n=0)
    with pytest.raises(ValueError, match="min_candidates"):
        CappyBestOfNMiddleware(scorer=KeywordScorer(), n=2, min_candidates=3)
    with pytest.raises(ValueError, match="temperature"):
        CappyBestOfNMiddleware(scorer=KeywordScorer(), temperature=0)
