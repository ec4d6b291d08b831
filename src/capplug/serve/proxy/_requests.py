"""Reading what a client asked the proxy: the conversation, n, streaming, headers, rerank and score bodies."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers

from capplug.chat import Prompt
from capplug.serve._http import (
    APIError,
)

CHAT_PATH = "/v1/chat/completions"
MAX_RERANK_DOCUMENTS = 1000


TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


FALSE_VALUES = frozenset({"0", "false", "no", "off", ""})


def instruction_of(body: dict[str, Any]) -> Prompt:
    """The conversation, read once: the text the scorer reads and the task (its system
    message, else the whole text); raises a 400 naming what is wrong."""
    if "messages" not in body:
        raise APIError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(
            400,
            "Invalid value for 'messages': give a non-empty list of "
            "{'role': ..., 'content': ...} objects",
            param="messages",
            code="invalid_value",
        )
    try:
        return Prompt.of(messages, argument="messages")
    except (TypeError, ValueError) as error:
        raise APIError(
            400, f"Invalid value for 'messages': {error}", param="messages", code="invalid_value"
        ) from error


def choices_wanted(body: dict[str, Any], max_n: int) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise APIError(
            400,
            f"Invalid value for 'n': give a whole number >= 1; got {n!r}",
            param="n",
            code="invalid_value",
        )
    if n > max_n:
        raise APIError(
            400,
            f"Invalid value for 'n': this proxy returns at most {max_n} choices; got {n}",
            param="n",
            code="invalid_value",
        )
    return n


# OpenAI's own ranges for the sampling fields the proxy reads or passes on: (low, high, whole).
_SAMPLING_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "max_tokens": (1, None, True),
    "max_completion_tokens": (1, None, True),
    "top_logprobs": (0, 20, True),
    "seed": (None, None, True),
}
_MAX_STOP_SEQUENCES = 4


def check_sampling(body: dict[str, Any]) -> None:
    """Refuse a sampling field outside OpenAI's range with a 400 naming it, before any upstream
    call: a ``"hot"`` or ``NaN`` temperature is the client's mistake, not the upstream's."""
    for name, (low, high, whole) in _SAMPLING_RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        kind = "a whole number" if whole else "a number"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (whole and not isinstance(value, int)) or value != value:
            _bad(name, f"give {kind}; got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f">= {low}"
            _bad(name, f"give {kind} {bounds}; got {value!r}")
    if (
        "logprobs" in body
        and body["logprobs"] is not None
        and not isinstance(body["logprobs"], bool)
    ):
        _bad("logprobs", f"give true or false; got {body['logprobs']!r}")
    stop = body.get("stop")
    listed = isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    if (
        stop is not None
        and not isinstance(stop, str)
        and (not listed or len(stop) > _MAX_STOP_SEQUENCES)
    ):
        _bad("stop", f"give a string or a list of at most {_MAX_STOP_SEQUENCES} strings")


def _bad(name: str, why: str) -> None:
    raise APIError(400, f"Invalid value for '{name}': {why}", param=name, code="invalid_value")


def stream_flag(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` from the request."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(
            400,
            f"Invalid value for 'stream': give true or false; got {stream!r}",
            param="stream",
            code="invalid_value",
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return bool(stream), bool(stream) and include_usage


def header_flag(headers: Headers, name: str) -> bool:
    value = headers.get(name, "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise APIError(
        400,
        f"header {name} must be 1, true or yes (or 0, false, no); got {value!r}",
        code="invalid_header",
    )


def header_count(headers: Headers, name: str, max_n: int) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        count = int(value.strip())
    except ValueError:
        count = 0
    if not 1 <= count <= max_n:
        raise APIError(
            400,
            f"header {name} must be a whole number from 1 to {max_n}; got {value!r}",
            code="invalid_header",
        )
    return count


def rerank_request(body: dict[str, Any]) -> tuple[str, list[str], int, bool]:
    """``(query, document texts, top_n, return_documents)`` of a rerank request, or a 400.

    Documents are strings, or objects whose ``text`` is ranked (with ``rank_fields``, those
    fields, one ``name: value`` line each), as Cohere's and Jina's APIs take them.
    """
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise APIError(400, "'query' must be a non-empty string", param="query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not 1 <= len(documents) <= MAX_RERANK_DOCUMENTS:
        raise APIError(
            400,
            f"'documents' must be a list of 1 to {MAX_RERANK_DOCUMENTS} strings or objects",
            param="documents",
        )
    fields = body.get("rank_fields")
    if fields is not None and (
        not isinstance(fields, list) or not all(isinstance(f, str) for f in fields) or not fields
    ):
        raise APIError(400, "'rank_fields' must be a list of field names", param="rank_fields")
    texts = []
    for i, document in enumerate(documents):
        if isinstance(document, str):
            texts.append(document)
            continue
        if isinstance(document, dict):
            if fields:
                values = [(f, document.get(f)) for f in fields]
                if all(isinstance(v, str) for _, v in values):
                    texts.append("\n".join(f"{f}: {v}" for f, v in values))
                    continue
            elif isinstance(document.get("text"), str):
                texts.append(document["text"])
                continue
        wanted = f"the fields {fields}" if fields else "a 'text' string"
        raise APIError(
            400,
            f"documents[{i}] must be a string or an object with {wanted}",
            param=f"documents[{i}]",
        )
    top_n = body.get("top_n")
    if top_n is None:
        top_n = len(texts)
    elif isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise APIError(400, "'top_n' must be a positive integer", param="top_n")
    return_documents = body.get("return_documents")
    if return_documents is not None and not isinstance(return_documents, bool):
        raise APIError(400, "'return_documents' must be true or false", param="return_documents")
    return query, texts, min(top_n, len(texts)), bool(return_documents)


def score_request(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The (instruction, response) pairs of a score request, or a 400: ``text_1`` a string
    paired with every ``text_2``, or two lists of the same length paired in order."""
    first, second = body.get("text_1"), body.get("text_2")

    def texts(value: Any, name: str) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if (
            not isinstance(items, list)
            or not 1 <= len(items) <= MAX_RERANK_DOCUMENTS
            or not all(isinstance(t, str) for t in items)
        ):
            raise APIError(
                400,
                f"'{name}' must be a string or a list of 1 to {MAX_RERANK_DOCUMENTS} strings",
                param=name,
            )
        return items

    instructions, responses = texts(first, "text_1"), texts(second, "text_2")
    if isinstance(first, str):
        return [(first, r) for r in responses]
    if len(instructions) != len(responses):
        raise APIError(
            400,
            f"'text_1' and 'text_2' are paired in order, so they must be as long as each other "
            f"(or 'text_1' one string); got {len(instructions)} and {len(responses)}",
            param="text_2",
        )
    return list(zip(instructions, responses, strict=True))
