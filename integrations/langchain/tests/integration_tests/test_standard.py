"""LangChain's standard chat-model integration tests (``langchain_tests``) for CappyBestOfN.

CappyBestOfN wraps ``ChatOpenAI`` pointed at capplug's local OpenAI-compatible server serving the
packaged SmolLM2, and chooses with capplug's default scorer. Small replies (``max_tokens=12``) and
two candidates per call keep the module quick on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from capplug import Scorer
from capplug.llms import LocalChatModel
from capplug.serve import create_app, serve_in_thread
from langchain_capplug import CappyBestOfN

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"

# Filled by the module's server fixture before any test builds a model.
_LOCAL: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def local_server() -> Iterator[None]:
    model = LocalChatModel.from_pretrained(MODEL, device="cpu")
    with serve_in_thread(create_app(model, model_name=MODEL)) as url:
        _LOCAL.update(url=url, scorer=Scorer())
        yield
        _LOCAL.clear()


class TestCappyBestOfNIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[CappyBestOfN]:
        return CappyBestOfN

    @property
    def chat_model_params(self) -> dict[str, Any]:
        llm = ChatOpenAI(
            model=MODEL,
            base_url=f"{_LOCAL['url']}/v1",
            api_key="local",
            temperature=0,  # CappyBestOfN samples it at its own temperature (0.8)
            max_tokens=12,
            timeout=120,
        )
        return {"llm": llm, "scorer": _LOCAL["scorer"], "n": 2}

    # The local server refuses `tools` with a 400, so nothing that needs tool calling can run:
    # no tool calling, no tool choice, and no structured output (BaseChatModel's default
    # with_structured_output, which CappyBestOfN uses, works by tool calling). No JSON mode
    # either (the server refuses a non-text response_format, and the default ignores `method`).
    # Text only: no image, audio or PDF inputs.

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    # The chosen candidate keeps ChatOpenAI's usage_metadata and model_name, on invoke and
    # on stream (where the chosen message is yielded whole).
    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # `model=` is passed through to ChatOpenAI, but the server serves one model and names it
    # in every response whatever the request asked for, so there is no model to override with:
    # model_override_value stays None and the override tests skip.
