"""The adapter service's answers: a ``chat.completion`` with its ``capplug`` object, the same
streamed as its tokens are drawn, and ``Server-Timing``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse

from capplug.adapters.store import AdapterRecord
from capplug.models.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from capplug.serve import _chat
from capplug.serve.adapter_service._service import Answer, Plan, Service


def completion(service: Service, answer: Answer) -> dict[str, Any]:
    """The answer as OpenAI's ``chat.completion``, with the ``capplug`` object: the adapter
    found, how it was picked, which side answered (the judged fallback), and the timings.
    ``model`` names what answered: the adapter (as the request named it, the way vLLM echoes
    a LoRA's name; ``<base>@<id>`` for one found by instruction), or the base model when it
    fell back."""
    model = service.model_name
    if answer.adapter_id is not None and answer.used != "base":
        model = answer.asked_as or f"{model}@{answer.adapter_id}"
    source = (
        "base" if answer.adapter_id is None else ("instruction" if answer.hit is not None else "id")
    )
    usage = _chat.usage_json(answer.prompt_tokens, answer.completion_tokens)
    choices = zip(answer.texts, answer.finish, strict=True)
    return {
        **_chat.completion_json(f"chatcmpl-{uuid.uuid4().hex}", model, choices, usage),
        "capplug": {
            "adapter": answer.adapter_id,
            "source": source,
            "hit": answer.hit,
            "similarity": None if answer.similarity is None else round(answer.similarity, 4),
            "loaded": answer.loaded,
            "fallback": answer.fallback,
            "timings": answer.timings,
        },
    }


async def streamed(service: Service, plan: Plan) -> Response:
    """One choice streamed as its tokens are drawn; the adapter's ``capplug`` object comes with
    the last chunk. A failure before the first token (no adapter can be made, say) is an
    ordinary error answer."""
    streamer, work = _chat.start_streaming(lambda queue: service.answer(plan, queue))
    first = await _chat.first_step(streamer, work)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tokenizer = service.runtime.chat.tokenizer
    stop_ids = service.runtime.chat.eos_token_ids

    async def events() -> AsyncIterator[str]:
        def event(model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
            return _chat.chunk_event(completion_id, created, model, choices, extra=extra)

        def delta(content: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}

        model = service.model_name
        yield event(model, [delta({"role": "assistant", "content": ""})])
        sent = ""
        # Stop sequences are only known to have ended the reply once it is whole.
        if not plan.stops:
            async for piece in _chat.new_text(first, streamer, tokenizer, stop_ids):
                yield event(model, [delta({"content": piece})])
                sent += piece
        done = await work
        whole = completion(service, done)
        text = done.texts[0]
        if text.startswith(sent) and len(text) > len(sent):
            yield event(whole["model"], [delta({"content": text[len(sent) :]})])
        yield event(
            whole["model"],
            [delta({}, done.finish[0])],
            usage=whole["usage"],
            capplug=whole["capplug"],
        )
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def server_timing(timings: dict[str, float]) -> str:
    """The ``Server-Timing`` header for an answer's timings (ms)."""
    return ", ".join(f"{name};dur={value:g}" for name, value in timings.items())


def adapter_json(record: AdapterRecord) -> dict[str, Any]:
    """An adapter as the service lists it: its record, and its two files with their sizes."""
    files = []
    for name, sha in ((ADAPTER_WEIGHTS, record.sha256), (ADAPTER_CONFIG, record.config_sha256)):
        try:
            size: int | None = (record.folder / name).stat().st_size
        except OSError:
            size = None
        files.append(
            {
                "name": name,
                "bytes": size,
                "sha256": sha,
                "url": f"/v1/adapters/{record.id}/files/{name}",
            }
        )
    return {
        "id": record.id,
        "object": "adapter",
        "base_model": record.base_model,
        "instruction": record.instruction,
        "source": record.source,
        "rank": record.rank,
        "target_modules": list(record.target_modules),
        "size": record.size,
        "created": record.created,
        "last_used": record.last_used,
        "hypernetwork_version": record.hypernetwork_version,
        "name": record.name,
        "check": None if record.check is None else record.check.to_dict(),
        "pinned": record.pinned,
        "falls_back": record.falls_back,
        "files": files,
    }
