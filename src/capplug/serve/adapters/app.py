"""The adapter service: :func:`create_adapter_app`, its request and reply models, and its
routes; what each route does is in the package's docstring and docs/adapter-service.md."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from capplug.adapters.fallback import AdapterJudge
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import AdapterStore
from capplug.models.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    WrongBaseModelError,
)
from capplug.serve import _chat
from capplug.serve._http import (
    APIError,
    BodyLimit,
    RequireKey,
    SafePath,
    check_positive_int,
    install_error_handlers,
)
from capplug.serve._request_metrics import CountRequests, RequestMetrics
from capplug.serve.adapters._fallback import require_judge
from capplug.serve.adapters._replies import adapter_json, completion, server_timing, streamed
from capplug.serve.adapters._schema import (
    Adapter,
    AdapterList,
    AdapterResult,
    ChatCompletion,
    ChatCompletionRequest,
    CheckAdapter,
    CreateAdapter,
    Deleted,
    Error,
    Health,
    LoadLoRA,
    ModelCard,
    ModelList,
    PatchAdapter,
    UnloadLoRA,
    errors,
)
from capplug.serve.adapters._service import Service, ServiceMetrics

__all__ = ["create_adapter_app"]

_MEDIA_TYPES = {ADAPTER_WEIGHTS: "application/octet-stream", ADAPTER_CONFIG: "application/json"}
_MAX_LIST = 1000

# ------------------------------------------------------------------ errors, keys, metrics


_on_validation_error = _chat.validation_error_handler(
    "the request body must be a JSON object (with Content-Type: application/json); "
    "see /openapi.json for its fields"
)


_ROUTES = (
    (r"/v1/chat/completions", "/v1/chat/completions"),
    (r"/v1/adapters", "/v1/adapters"),
    (r"/v1/adapters/[^/]+", "/v1/adapters/{id}"),
    (r"/v1/adapters/[^/]+/check", "/v1/adapters/{id}/check"),
    (r"/v1/adapters/[^/]+/files/[^/]+", "/v1/adapters/{id}/files/{name}"),
    (r"/v1/load_lora_adapter", "/v1/load_lora_adapter"),
    (r"/v1/unload_lora_adapter", "/v1/unload_lora_adapter"),
    (r"/v1/models", "/v1/models"),
    (r"/v1/models/.+", "/v1/models/{id}"),
    (r"/healthz", "/healthz"),
    (r"/metrics", "/metrics"),
)


def _key_headers(path: str) -> list[Any]:
    """The key guards every ``/v1`` route and ``/metrics`` (``Authorization: Bearer``)."""
    return _chat.v1_key_headers(path) or (_chat.v1_key_headers("/v1") if path == "/metrics" else [])


# ------------------------------------------------------------------------------------ app


def create_adapter_app(
    store: AdapterStore,
    runtime: AdapterRuntime,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_instruction_chars: int = 4096,
    max_messages: int = 256,
    max_tokens_cap: int = 512,
    max_n: int = 8,
    allow_load_from_path: bool = False,
    judge: AdapterJudge | None = None,
) -> FastAPI:
    """The adapter service over ``store`` and ``runtime``; see the package's docstring
    (:mod:`capplug.serve.adapters`).

    Args:
        store: the adapters (its ``generator``, when set, makes new ones on a miss).
        runtime: the local model the adapters attach to; made for the store's base model.
        model_name: the id ``/v1/models`` lists and requests name (default: the store's
            base model); the store's base model name is accepted too.
        api_key: when set, every ``/v1`` route asks for ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get a 413.
        max_instruction_chars: longer instructions get a 400 (never cut silently); at most the
            store's own ``max_instruction_chars``.
        max_messages: the most chat messages one request may carry.
        max_tokens_cap: the most tokens one choice may have; also the default ``max_tokens``.
        max_n: the most choices (``n``) one request may ask for.
        allow_load_from_path: let ``POST /v1/load_lora_adapter`` import a peft folder from a
            path on this server (a privilege, as vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``);
            without it that route answers 403.
        judge: the judged fallback (:class:`~capplug.adapters.AdapterJudge` over this
            runtime): each adapter found or made for an instruction is checked against the bare
            base model on its first request, and one that lost is not used; requests may ask
            ``fallback: "best_of"``. Without one, adapters always answer.

    Raises:
        WrongBaseModelError: the runtime's model is not the store's base model.
    """
    if not isinstance(store, AdapterStore):
        raise TypeError(f"store must be an AdapterStore; got {type(store).__name__}")
    if not isinstance(runtime, AdapterRuntime):
        raise TypeError(f"runtime must be an AdapterRuntime; got {type(runtime).__name__}")
    for value, argument in (
        (max_body_bytes, "max_body_bytes"),
        (max_instruction_chars, "max_instruction_chars"),
        (max_messages, "max_messages"),
        (max_tokens_cap, "max_tokens_cap"),
        (max_n, "max_n"),
    ):
        check_positive_int(value, argument)
    if judge is not None and (not isinstance(judge, AdapterJudge) or judge.runtime is not runtime):
        raise ValueError("judge must be an AdapterJudge over the same runtime, or None")
    if not isinstance(allow_load_from_path, bool):
        raise TypeError(f"allow_load_from_path must be a bool; got {allow_load_from_path!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string, or None for no key")
    if model_name is not None and (not isinstance(model_name, str) or not model_name.strip()):
        raise ValueError(f"model_name must be a non-empty string; got {model_name!r}")
    if runtime.identity.name.casefold() != store.base_model.casefold():
        raise WrongBaseModelError(
            f"the runtime's model is {runtime.identity.name}, but the store holds adapters for "
            f"{store.base_model}; open the store with base_model={runtime.identity.name!r}"
        )
    name = model_name or store.base_model
    if "@" in name:
        raise ValueError(f"model_name cannot hold '@' (it separates adapter ids); got {name!r}")
    service = Service(
        store,
        runtime,
        model_name=name,
        max_instruction_chars=min(max_instruction_chars, store.max_instruction_chars),
        max_messages=max_messages,
        max_tokens_cap=max_tokens_cap,
        max_n=max_n,
        judge=judge,
        # A hit check generates with the same runtime (inside lookups): one lock for both.
        lock=getattr(store.verify_hit, "lock", None)
        if getattr(store.verify_hit, "runtime", None) is runtime
        else None,
    )
    created = int(time.time())
    card = {"id": name, "object": "model", "created": created, "owned_by": "capplug"}

    app = FastAPI(
        title="capplug adapter service",
        summary=f"LoRA adapters for {name} by instruction, and chat completions that use them.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.adapter_service = service
    metrics = RequestMetrics("capplug_adapters", _ROUTES)
    service.metrics = ServiceMetrics(metrics.registry)
    install_error_handlers(app)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(SafePath)  # innermost: no route sees a path out of its base
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        # Added last so it runs first: an unauthenticated request learns nothing else.
        app.add_middleware(RequireKey, api_key=api_key, headers_for=_key_headers)
    # Outermost: refused and oversized requests are counted too.
    app.add_middleware(CountRequests, metrics=metrics)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "can_create": store.generator is not None,
            "judge": None if judge is None else judge.name,
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=errors())
    async def list_models() -> dict[str, Any]:
        # The base model, then each stored adapter as vLLM lists LoRA adapters: its own id
        # (what `model` takes) with the base as `parent`.
        records = await run_in_threadpool(store.list_adapters, order="created")
        adapters = [_adapter_card(card, r) for r in records]
        return {"object": "list", "data": [card, *adapters]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(404))
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        adapter_id = await run_in_threadpool(service.adapter_in_model, model_id)
        if adapter_id is None:
            return card
        record = await run_in_threadpool(service.record, adapter_id)
        return _adapter_card(card, record)

    @app.post(
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

    @app.get("/v1/adapters", response_model=AdapterList, responses=errors(400))
    async def list_adapters(
        limit: int = Query(100, ge=1, le=_MAX_LIST, description="most adapters to list"),
    ) -> dict[str, Any]:
        def listing() -> list[dict[str, Any]]:
            records = store.list_adapters()[:limit]
            return [adapter_json(r) for r in records]

        return {"object": "list", "data": await run_in_threadpool(listing)}

    @app.get("/v1/adapters/{adapter_id}", response_model=Adapter, responses=errors(404))
    async def retrieve_adapter(adapter_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.record, adapter_id)
        return await run_in_threadpool(adapter_json, record)

    @app.get(
        "/v1/adapters/{adapter_id}/files/{name}",
        response_class=Response,
        responses={
            200: {
                "description": "the file's bytes",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            },
            403: {"model": Error, "description": "not a regular file in the adapter's folder"},
            **errors(404, 500),
        },
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

    @app.patch("/v1/adapters/{adapter_id}", response_model=Adapter, responses=errors(404))
    async def patch_adapter(adapter_id: str, body: PatchAdapter) -> dict[str, Any]:
        record = await run_in_threadpool(service.pin, adapter_id, body.pinned)
        return await run_in_threadpool(adapter_json, record)

    @app.post(
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

    @app.delete("/v1/adapters/{adapter_id}", response_model=Deleted, responses=errors(404))
    async def delete_adapter(adapter_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.delete, adapter_id)
        return {"id": record.id, "object": "adapter", "deleted": True}

    _text_reply = {
        "description": "vLLM's answer, as text; X-Capplug-Adapter names the adapter's id",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }

    @app.post(
        "/v1/load_lora_adapter",
        responses={200: _text_reply, **errors(400, 403, 409)},
    )
    async def load_lora_adapter(body: LoadLoRA) -> Response:
        if not allow_load_from_path:
            raise APIError(
                403,
                "this service does not load adapters from paths on the server: start it with "
                "`capplug serve adapters --allow-lora-loading` (create_adapter_app(..., "
                "allow_load_from_path=True)), or import with `capplug store import FOLDER "
                "--name NAME`",
                code="lora_loading_disabled",
                kind="permission_error",
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

    @app.post(
        "/v1/unload_lora_adapter",
        responses={200: _text_reply, **errors(404)},
    )
    async def unload_lora_adapter(body: UnloadLoRA) -> Response:
        record = await run_in_threadpool(service.unload_lora, body.lora_name)
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
            headers={"X-Capplug-Adapter": record.id},
        )

    @app.post(
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

    return app


def _adapter_card(base: dict[str, Any], record: Any) -> dict[str, Any]:
    """A stored adapter as ``/v1/models`` lists it: its name (as vLLM lists a LoRA adapter), or
    ``<base>@<id>`` when it has none, with its base as parent."""
    return {
        **base,
        "id": record.name or f"{base['id']}@{record.id}",
        "created": int(record.created),
        "parent": base["id"],
        "root": record.id,
    }
