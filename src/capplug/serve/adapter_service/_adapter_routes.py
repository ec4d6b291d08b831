"""The adapter routes: ``/v1/adapters`` (find or make, list, retrieve, pin, check, delete, read a
file) and vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from capplug.models.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from capplug.serve._http import APIError
from capplug.serve.adapter_service._fallback import require_judge
from capplug.serve.adapter_service._replies import adapter_json
from capplug.serve.adapter_service._schema import (
    Adapter,
    AdapterList,
    AdapterResult,
    CheckAdapter,
    CreateAdapter,
    Deleted,
    Error,
    LoadLoRA,
    PatchAdapter,
    UnloadLoRA,
    errors,
)
from capplug.serve.adapter_service._service import Service

__all__ = ["adapter_routes", "lora_routes"]

_MEDIA_TYPES = {ADAPTER_WEIGHTS: "application/octet-stream", ADAPTER_CONFIG: "application/json"}
_MAX_LIST = 1000

_FILE_REPLIES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the file's bytes",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object"}},
        },
    },
    403: {"model": Error, "description": "not a regular file in the adapter's folder"},
}

_TEXT_REPLY = {
    "description": "vLLM's answer, as text; X-Capplug-Adapter names the adapter's id",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}

_LOADING_DISABLED = (
    "this service does not load adapters from paths on the server: start it with "
    "`capplug serve adapters --allow-lora-loading` (create_adapter_app(..., "
    "allow_load_from_path=True)), or import with `capplug store import FOLDER --name NAME`"
)


def adapter_routes(service: Service) -> APIRouter:
    """``/v1/adapters``: an adapter for an instruction (found or made), and the stored ones."""
    router = APIRouter()
    store = service.store

    @router.post(
        "/v1/adapters",
        response_model=AdapterResult,
        status_code=200,
        responses={
            201: {"model": AdapterResult, "description": "a new adapter was made"},
            **errors(400, 500, 503),
        },
    )
    async def create_adapter(body: CreateAdapter) -> Response:
        text = service.instruction(body.instruction)
        if body.probe is not None:
            require_judge(service.judge)
        record, result = await run_in_threadpool(service.get_or_create, text, body.threshold)
        if body.probe is not None:
            record = await run_in_threadpool(service.check, record.id, body.probe)
        data = await run_in_threadpool(adapter_json, record)
        data.update(
            hit=result.hit,
            similarity=None if result.similarity is None else round(result.similarity, 4),
        )
        return JSONResponse(data, status_code=200 if result.hit else 201)

    @router.get("/v1/adapters", response_model=AdapterList, responses=errors(400))
    async def list_adapters(
        limit: int = Query(100, ge=1, le=_MAX_LIST, description="most adapters to list"),
    ) -> dict[str, Any]:
        def listing() -> list[dict[str, Any]]:
            return [adapter_json(r) for r in store.list_adapters()[:limit]]

        return {"object": "list", "data": await run_in_threadpool(listing)}

    @router.get("/v1/adapters/{adapter_id}", response_model=Adapter, responses=errors(404))
    async def retrieve_adapter(adapter_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.record, adapter_id)
        return await run_in_threadpool(adapter_json, record)

    @router.get(
        "/v1/adapters/{adapter_id}/files/{name}",
        response_class=Response,
        responses={**_FILE_REPLIES, **errors(404, 500)},
    )
    async def adapter_file(adapter_id: str, name: str) -> Response:
        data = await run_in_threadpool(service.file_bytes, adapter_id, name)
        return Response(
            data,
            media_type=_MEDIA_TYPES[name],
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Content-Type-Options": "nosniff",
            },
        )

    router.include_router(_changes(service))
    return router


def _changes(service: Service) -> APIRouter:
    """What a person or client changes about a stored adapter: pin, check, delete."""
    router = APIRouter()

    @router.patch("/v1/adapters/{adapter_id}", response_model=Adapter, responses=errors(404))
    async def patch_adapter(adapter_id: str, body: PatchAdapter) -> dict[str, Any]:
        record = await run_in_threadpool(service.pin, adapter_id, body.pinned)
        return await run_in_threadpool(adapter_json, record)

    @router.post(
        "/v1/adapters/{adapter_id}/check",
        response_model=Adapter,
        responses={
            422: {"model": Error, "description": "no probe given, and none could be made"},
            **errors(404, 500),
        },
    )
    async def check_adapter(adapter_id: str, body: CheckAdapter | None = None) -> dict[str, Any]:
        probe = None if body is None else body.probe
        record = await run_in_threadpool(service.check, adapter_id, probe)
        return await run_in_threadpool(adapter_json, record)

    @router.delete("/v1/adapters/{adapter_id}", response_model=Deleted, responses=errors(404))
    async def delete_adapter(adapter_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.delete, adapter_id)
        return {"id": record.id, "object": "adapter", "deleted": True}

    return router


def lora_routes(service: Service, *, allow_load_from_path: bool) -> APIRouter:
    """vLLM's runtime LoRA routes: load a peft folder from a path on this server (a privilege),
    and unload one by name."""
    router = APIRouter()

    @router.post("/v1/load_lora_adapter", responses={200: _TEXT_REPLY, **errors(400, 403, 409)})
    async def load_lora_adapter(body: LoadLoRA) -> Response:
        if not allow_load_from_path:
            raise APIError(
                403, _LOADING_DISABLED, code="lora_loading_disabled", kind="permission_error"
            )
        record = await run_in_threadpool(
            service.load_lora,
            body.lora_name,
            body.lora_path,
            body.instruction,
            inplace=body.load_inplace,
        )
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' added successfully.",
            headers={"X-Capplug-Adapter": record.id},
        )

    @router.post("/v1/unload_lora_adapter", responses={200: _TEXT_REPLY, **errors(404)})
    async def unload_lora_adapter(body: UnloadLoRA) -> Response:
        record = await run_in_threadpool(service.unload_lora, body.lora_name)
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
            headers={"X-Capplug-Adapter": record.id},
        )

    return router
