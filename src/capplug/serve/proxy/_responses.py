"""The Responses API (``POST /v1/responses``): what can be reranked, and how its shapes read.

A response is reranked like a chat completion: ``n`` single requests (the Responses API has no
``n``), the candidates' output text scored against ``instructions`` and ``input``, and the
chosen response returned with ``usage`` summed and a ``capplug`` object. Some requests cannot be
chosen among, and pass through untouched with an ``X-Capplug-Passthrough`` header saying why:
``stream: true`` (a stream is sent as it is generated), ``tools`` (tool calls are not scored),
``previous_response_id`` or ``conversation`` (candidates would fork a conversation the upstream
stores) and ``background: true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx2

from capplug.chat import Prompt
from capplug.llms.retry import UpstreamHTTPError
from capplug.serve._http import APIError
from capplug.serve.proxy._replies import json_body

__all__ = [
    "RESPONSES_PATH",
    "as_choice",
    "passthrough_reason",
    "response_object",
    "responses_instruction",
]

RESPONSES_PATH = "/v1/responses"
_TOOL_ITEMS = frozenset(
    {
        "function_call",
        "custom_tool_call",
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "local_shell_call",
        "mcp_call",
        "image_generation_call",
    }
)


def passthrough_reason(body: Mapping[str, Any]) -> str | None:
    """Why this request cannot be reranked (it then passes through), or ``None``."""
    if body.get("stream") is True:
        return "stream: true (a streamed response is sent as it is generated)"
    if body.get("tools"):
        return "the request offers tools (tool calls are not scored)"
    if body.get("previous_response_id") or body.get("conversation"):
        return "it continues a conversation the upstream stores (candidates would fork it)"
    if body.get("background") is True:
        return "background: true"
    return None


def responses_instruction(body: Mapping[str, Any]) -> Prompt:
    """``instructions`` and ``input``, read once: the text the scorer reads and the task
    (``instructions``, else the whole text)."""
    turns: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        turns.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        turns.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            if isinstance(item, Mapping) and isinstance(item.get("role"), str):
                turns.append({"role": item["role"], "content": _text(item.get("content"))})
    else:
        raise APIError(
            400,
            "'input' must be a string or a list of input items",
            param="input",
            code="invalid_value",
        )
    if not turns:
        raise APIError(
            400,
            "the request holds no text to answer: give 'input' (a string or messages)",
            param="input",
            code="invalid_value",
        )
    return Prompt.of(turns)


def response_object(response: httpx2.Response) -> dict[str, Any]:
    """The body of a successful Responses answer; raises for anything else."""
    body, snippet = json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("output"), list):
        raise UpstreamHTTPError(
            0,
            f"upstream answered {response.status_code} with JSON that is not a response "
            f"(no output list): {snippet!r}",
        )
    return body


def as_choice(response: Mapping[str, Any]) -> dict[str, Any]:
    """A response as the chat-completion choice the selection reads: its output text, and its
    tool calls when it makes any."""
    texts, calls = [], []
    for item in response.get("output", []):
        if not isinstance(item, Mapping):
            continue
        if item.get("type") in _TOOL_ITEMS:
            calls.append(item)
        elif item.get("type") == "message":
            texts.append(_text(item.get("content")))
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(t for t in texts if t)}
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""
