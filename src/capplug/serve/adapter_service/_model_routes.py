"""The routes a client asks before it talks: ``/healthz``, ``/metrics``, and ``/v1/models``
(the base model, then each stored adapter as vLLM lists a LoRA adapter), and the chat route that
answers with them, ``/v1/chat/completions``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from capplug.serve._request_metrics import RequestMetrics
from capplug.serve.adapter_service._replies import completion, server_timing, streamed
from capplug.serve.adapter_service._schema import (
    ChatCompletion,
    ChatCompletionRequest,
    Health,
    ModelCard,
    ModelList,
    errors,
)
from capplug.serve.adapter_service._service import Service

__all__ = ["chat_routes", "model_routes"]


def model_routes(service: Service, metrics: RequestMetrics) -> APIRouter:
    """``/healthz``, ``/metrics``, ``/v1/models`` and ``/v1/models/{id}``."""
    router = APIRouter()
    store, judge = service.store, service.judge
    card = {
        "id": service.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "capplug",
    }

    @router.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.model_name,
            "can_create": store.generator is not None,
            "judge": None if judge is None else judge.name,
        }

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models", response_model=ModelList, responses=errors())
    async def list_models() -> dict[str, Any]:
        records = await run_in_threadpool(store.list_adapters, order="created")
        return {"object": "list", "data": [card, *(adapter_card(card, r) for r in records)]}

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(404))
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        adapter_id = await run_in_threadpool(service.adapter_in_model, model_id)
        if adapter_id is None:
            return card
        record = await run_in_threadpool(service.record, adapter_id)
        return adapter_card(card, record)

    return router


def chat_routes(service: Service) -> APIRouter:
    """``/v1/chat/completions``: an answer from the adapter for the request's instruction (or
    the one it names, or the base model), streamed or whole."""
    router = APIRouter()

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses=errors(400, 404, 409, 500, 503),
    )
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        plan = await run_in_threadpool(service.plan, body)
        if plan.stream:
            return await streamed(service, plan)
        answer = await run_in_threadpool(service.answer, plan)
        headers = {"Server-Timing": server_timing(answer.timings)}
        if answer.adapter_id is not None and answer.used != "base":
            headers["X-Capplug-Adapter"] = answer.adapter_id
        return JSONResponse(completion(service, answer), headers=headers)

    return router


def adapter_card(base: dict[str, Any], record: Any) -> dict[str, Any]:
    """A stored adapter as ``/v1/models`` lists it: its name (as vLLM lists a LoRA adapter), or
    ``<base>@<id>`` when it has none, with its base as parent."""
    return {
        **base,
        "id": record.name or f"{base['id']}@{record.id}",
        "created": int(record.created),
        "parent": base["id"],
        "root": record.id,
    }
