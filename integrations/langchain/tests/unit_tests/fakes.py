"""Fakes for the unit tests: chat models that return scripted choices, and a keyword scorer."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field


class Script:
    """Replies handed out in order (cycling), with a record of every call; shared by copies."""

    def __init__(self, replies: list[Any], failures: list[BaseException] | None = None) -> None:
        self.replies = replies
        self.failures = list(failures or [])
        self.calls: list[dict[str, Any]] = []
        self.next = 0

    def take(self, count: int) -> list[Any]:
        out = []
        for _ in range(count):
            out.append(self.replies[self.next % len(self.replies)])
            self.next += 1
        return out


def _message(reply: Any) -> AIMessage:
    if isinstance(reply, AIMessage):
        return reply
    return AIMessage(content=reply)


class SingleChatModel(BaseChatModel):
    """A chat model with a temperature but no `n`: one reply per call."""

    script: Any
    temperature: float | None = 0.0

    @property
    def _llm_type(self) -> str:
        return "fake-single"

    def _generate(self, messages: list[BaseMessage], stop=None, run_manager=None, **kwargs):
        self.script.calls.append({"temperature": self.temperature, **kwargs})
        if self.script.failures:
            raise self.script.failures.pop(0)
        return ChatResult(
            generations=[ChatGeneration(message=_message(r)) for r in self.script.take(1)]
        )

    def bind_tools(self, tools, **kwargs):
        return self.bind(tools=[getattr(t, "name", t) for t in tools], **kwargs)


class ChoicesChatModel(SingleChatModel):
    """A chat model with an `n` setting, like ChatOpenAI: up to `max_choices` replies per call."""

    n: int = 1
    max_choices: int = Field(default=64)

    @property
    def _llm_type(self) -> str:
        return "fake-choices"

    def _generate(self, messages: list[BaseMessage], stop=None, run_manager=None, **kwargs):
        self.script.calls.append({"temperature": self.temperature, **kwargs})
        if self.script.failures:
            raise self.script.failures.pop(0)
        count = min(kwargs.get("n", self.n), self.max_choices)
        return ChatResult(
            generations=[ChatGeneration(message=_message(r)) for r in self.script.take(count)]
        )


class NamedChoicesChatModel(ChoicesChatModel):
    """A ChoicesChatModel with a model name, as provider models have (traced as ls_model_name)."""

    model: str = "fake-choices-001"


class KeywordScorer:
    """Scores 0.9 for responses containing `good`, else a small length-based score."""

    def __init__(self, good: str = "Paris") -> None:
        self.good = good
        self.calls: list[tuple[Any, list[str]]] = []

    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        self.calls.append((instruction, list(responses)))
        return [0.9 if self.good in r else min(0.5, len(r) / 1000) for r in responses]

    def score_pairs(self, pairs):
        return [0.9 if self.good in r else min(0.5, len(r) / 1000) for _, r in pairs]


class BrokenScorer:
    def score(self, instruction, responses):
        raise RuntimeError("scorer exploded")
