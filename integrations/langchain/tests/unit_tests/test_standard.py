"""LangChain's standard chat-model unit tests (``langchain_tests``) for CappyBestOfN.

The wrapped model is a scripted fake with an ``n`` setting and a model name (like ``ChatOpenAI``);
the scorer is the keyword fake. No network: run under ``--disable-socket``.
"""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_capplug import CappyBestOfN

from .fakes import KeywordScorer, NamedChoicesChatModel, Script


class TestCappyBestOfNStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[CappyBestOfN]:
        return CappyBestOfN

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The standard parameters (max_tokens, timeout, stop, max_retries, api_key) belong to the
        # inner model and are ignored here. `temperature` is CappyBestOfN's own: the temperature
        # a model set to 0 is sampled at, so that candidates differ. It must be > 0, and this
        # overrides the standard temperature=0.
        return {
            "llm": NamedChoicesChatModel(script=Script(["Paris.", "Lyon."])),
            "scorer": KeywordScorer(),
            "n": 2,
            "temperature": 0.8,
        }

    # Feature flags. Tools: bind_tools formats them with the inner model's bind_tools, so
    # has_tool_calling is True (detected from the override). has_tool_choice stays False (the
    # default read from the signature): tool_choice is passed through to the inner model, so it
    # is forced only where that model forces it. Structured output: BaseChatModel's default
    # with_structured_output (function calling through bind_tools, tool_choice="any"), so
    # has_structured_output is True (via has_tool_calling) and JSON mode is not supported
    # (the default ignores `method`).

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return False
