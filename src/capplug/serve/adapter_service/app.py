"""The adapter service: :func:`create_adapter_app`, its checks, middleware and route groups;
what each route does is in the package's docstring and docs/adapter-service.md."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from capplug.adapters.fallback import AdapterJudge
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import AdapterStore
from capplug.models.adapter_folder import WrongBaseModelError
from capplug.serve import _chat
from capplug.serve._http import (
    BodyLimit,
    RequireKey,
    SafePath,
    check_positive_int,
    install_error_handlers,
)
from capplug.serve._request_metrics import CountRequests, RequestMetrics
from capplug.serve.adapter_service._adapter_routes import adapter_routes, lora_routes
from capplug.serve.adapter_service._metrics import ServiceMetrics
from capplug.serve.adapter_service._model_routes import chat_routes, model_routes
from capplug.serve.adapter_service._service import Service

__all__ = ["create_adapter_app"]

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
    (:mod:`capplug.serve.adapter_service`).

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
    _check_arguments(
        store,
        runtime,
        judge=judge,
        api_key=api_key,
        model_name=model_name,
        allow_load_from_path=allow_load_from_path,
        limits={
            "max_body_bytes": max_body_bytes,
            "max_instruction_chars": max_instruction_chars,
            "max_messages": max_messages,
            "max_tokens_cap": max_tokens_cap,
            "max_n": max_n,
        },
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
    app.include_router(model_routes(service, metrics))
    app.include_router(adapter_routes(service))
    app.include_router(lora_routes(service, allow_load_from_path=allow_load_from_path))
    app.include_router(chat_routes(service))
    return app


def _check_arguments(
    store: Any,
    runtime: Any,
    *,
    judge: Any,
    api_key: Any,
    model_name: Any,
    allow_load_from_path: Any,
    limits: dict[str, Any],
) -> None:
    """:func:`create_adapter_app`'s arguments checked, each failure naming the argument."""
    if not isinstance(store, AdapterStore):
        raise TypeError(f"store must be an AdapterStore; got {type(store).__name__}")
    if not isinstance(runtime, AdapterRuntime):
        raise TypeError(f"runtime must be an AdapterRuntime; got {type(runtime).__name__}")
    for argument, value in limits.items():
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
