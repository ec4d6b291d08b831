"""The reranking proxy: :func:`create_proxy_app`, its settings and its routes (docs/proxy.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx2
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)

from capplug.llms.retry import DEFAULT_RETRY, RetryPolicy
from capplug.selection import Reranker
from capplug.serve._feedback import install_feedback_routes
from capplug.serve._http import (
    BEARER,
    BodyLimit,
    KeyHeader,
    RequireKey,
    SafePath,
    check_positive_int,
    install_error_handlers,
)
from capplug.serve._scoring_queue import ScoringQueue
from capplug.serve.proxy._candidates import Candidates
from capplug.serve.proxy._chat_routes import ChatRoutes
from capplug.serve.proxy._metrics import Metered, ProxyMetrics
from capplug.serve.proxy._requests import CHAT_PATH
from capplug.serve.proxy._responses import RESPONSES_PATH
from capplug.serve.proxy._scorer_routes import ScorerRoutes
from capplug.serve.proxy._upstream import Relayed, Upstream, on_relayed

__all__ = ["KEY_HEADER", "create_proxy_app"]


KEY_HEADER = "X-Capplug-Key"
"""The header that carries the proxy's own API key (``Authorization`` belongs to the upstream)."""


# Cohere's v1 and v2 clients, Jina's, vLLM's and LangChain's or LlamaIndex's Cohere rerankers.
_RERANK_PATHS = ("/v1/rerank", "/v2/rerank")


_SCORE_PATH = "/v1/score"  # vLLM's


_PROXY_KEY = KeyHeader(KEY_HEADER)


# How long a model's quirk (no native n, no logprobs) is believed before it is tried again: one
# short reply or one transient 400 costs minutes of single requests, not the process's lifetime.
_QUIRK_SECONDS = 600.0


def _key_headers(path: str) -> list[KeyHeader]:
    """Where the proxy's key is asked for, and in which headers (``Authorization`` too on the
    routes the proxy answers itself, where no upstream key is at stake)."""
    if path == "/healthz":
        return []
    if path == "/metrics" or path in _RERANK_PATHS or path == _SCORE_PATH:
        return [_PROXY_KEY, BEARER]
    return [_PROXY_KEY]


def create_proxy_app(
    upstream: str,
    *,
    scorer: Any,
    n: int = 8,
    max_n: int = 32,
    retry: RetryPolicy = DEFAULT_RETRY,
    timeout: float = 120.0,
    api_key: str | None = None,
    upstream_api_key: str | None = None,
    max_body_bytes: int = 16 << 20,
    native_n: Literal["auto", "never"] = "auto",
    sampling_temperature: float | None = 0.8,
    max_connections: int = 256,
    transport: httpx2.AsyncBaseTransport | None = None,
    request_logprobs: bool = True,
    feedback: Any = None,
    scoring_threads: int = 1,
    task_scorers: Any = None,
    auto_adapt: Any = None,
) -> FastAPI:
    """A FastAPI app that reranks chat completions from ``upstream``; see the module docstring.

    Args:
        upstream: the upstream's OpenAI base URL, as a client would use it
            (``https://api.openai.com/v1``); the proxy's ``/v1/<path>`` maps to
            ``<upstream>/<path>``.
        scorer: a :class:`capplug.Scorer` (``Scorer()`` for the bundled one), anything with
            ``.score(instruction, responses)``, or a scorer reference (a folder, a Hugging Face
            id, a packaged name).
        n: candidates per request unless the request's ``X-Capplug-N`` header says otherwise.
        max_n: the most candidates (``X-Capplug-N``) or choices (``n``) a request may ask for.
        retry: the retry policy for each upstream chat-completions call.
        timeout: seconds one upstream attempt may take (connecting: at most 10 of them).
        api_key: when set, every path but ``/healthz`` asks for ``X-Capplug-Key: <api_key>``.
        upstream_api_key: when set, sent upstream as ``Authorization: Bearer ...`` in place of
            the client's own ``Authorization``.
        max_body_bytes: larger request bodies get a 413 (pass-through bodies included).
        native_n: ``"auto"`` asks for ``n`` choices in one request first (and remembers models
            whose upstream ignores or refuses it); ``"never"`` always sends single requests.
        sampling_temperature: the temperature candidates are sampled at when a request asks for
            ``temperature: 0`` (greedy candidates would all be the same); ``None`` keeps 0.
        max_connections: the most connections open to the upstream at once.
        transport: an ``httpx2`` transport for the upstream (tests pass a mock one).
        request_logprobs: ask the upstream for ``logprobs`` (a selection signal) when the
            request does not say; a model whose upstream refuses them (400) is asked again
            without, and not asked again. The client gets ``logprobs`` only if it asked.
        feedback: a :class:`capplug.feedback.FeedbackStore` (or a path to one) that records
            every reranked answer's candidates and choice, so that clients can judge them
            (``POST /v1/feedback`` with the answer's ``selection_id``); ``None`` records nothing.
        task_scorers: score each request with the task scorer adapted to its task (its system
            message, else the whole conversation) where the guard allowed one: a
            :class:`capplug.adapters.TaskScorers`, a folder, or ``True`` for the default folder.
            Task scorers stored while the proxy runs are used from the next request on; the
            answer's ``capplug.task_scorer`` says which scored and why.
        scoring_threads: threads that score the parts of each scoring call, each with one torch
            thread; more than 1 only where torch is set to one thread (``capplug serve proxy``
            does this on a machine without a GPU), else they would oversubscribe the cores.
        auto_adapt: adapt task scorers as feedback arrives, with no command to run: a count N
            (a task is adapted once it has 8 judged selections, and again after every N more;
            in a background thread, one task at a time, behind the guard), or a
            :class:`capplug.training.auto_adapt.AutoAdapter`. Needs ``feedback`` and
            ``task_scorers``.
    """
    _check_arguments(
        upstream,
        retry=retry,
        timeout=timeout,
        native_n=native_n,
        sampling_temperature=sampling_temperature,
        keys={"api_key": api_key, "upstream_api_key": upstream_api_key},
        counts={
            "n": n,
            "max_n": max_n,
            "max_body_bytes": max_body_bytes,
            "max_connections": max_connections,
        },
    )
    from capplug.scoring import load_scorer

    loaded = load_scorer(scorer)
    reranker = Reranker(loaded, feedback=feedback, task_scorers=task_scorers)
    adapter = _auto_adapter(auto_adapt, reranker)
    proxy_metrics = ProxyMetrics()
    target = Upstream(
        upstream,
        metrics=proxy_metrics,
        retry=retry,
        timeout=float(timeout),
        upstream_api_key=upstream_api_key,
        max_connections=max_connections,
        transport=transport,
    )
    scoring = ScoringQueue(loaded, threads=scoring_threads)
    candidates = Candidates(
        target,
        scoring=scoring,
        selector=reranker.selector(surface="proxy"),
        native_n=native_n,
        quirk_seconds=_QUIRK_SECONDS,
    )
    chat = ChatRoutes(
        target,
        candidates,
        n=n,
        max_n=max_n,
        sampling_temperature=sampling_temperature,
        request_logprobs=bool(request_logprobs),
        quirk_seconds=_QUIRK_SECONDS,
    )

    return _app(
        target,
        chat,
        ScorerRoutes(scoring, proxy_metrics),
        proxy_metrics=proxy_metrics,
        feedback_store=reranker.feedback,
        adapter=adapter,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
    )


def _auto_adapter(auto_adapt: Any, reranker: Reranker) -> Any:
    """The proxy's auto-adapter over the reranker's feedback and task scorers, or None."""
    if auto_adapt is None:
        return None
    from capplug.training.auto_adapt import as_auto_adapter

    return as_auto_adapter(auto_adapt, reranker.feedback, reranker.task_scorers, owner="the proxy")


def _app(
    target: Upstream,
    chat: ChatRoutes,
    scored: ScorerRoutes,
    *,
    proxy_metrics: ProxyMetrics,
    feedback_store: Any,
    adapter: Any,
    api_key: str | None,
    max_body_bytes: int,
) -> FastAPI:
    """The proxy's app: its middleware (outermost first: metering, the key, the body limit, the
    path check) and its routes over the parts :func:`create_proxy_app` made."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await target.aclose()
        if adapter is not None:
            await asyncio.to_thread(adapter.close)

    app = FastAPI(
        title="capplug reranking proxy",
        summary=f"OpenAI-compatible; chat completions from {target.name} reranked by capplug.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.add_exception_handler(Relayed, on_relayed)
    app.add_middleware(SafePath)  # innermost: no route sees a path out of its base
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key, headers_for=_key_headers, what="proxy key")
    # Outermost: refused and oversized requests are counted too.
    app.add_middleware(Metered, metrics=proxy_metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(CHAT_PATH, response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await chat.chat_completions(request)

    for path in _RERANK_PATHS:
        app.add_api_route(path, scored.rerank, methods=["POST"], response_model=None)
    app.add_api_route(_SCORE_PATH, scored.score, methods=["POST"], response_model=None)
    install_feedback_routes(
        app, feedback_store, on_judged=None if adapter is None else adapter.notify
    )
    app.state.auto_adapter = adapter
    app.add_api_route(RESPONSES_PATH, chat.responses, methods=["POST"], response_model=None)

    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        response_model=None,
    )
    async def passthrough(request: Request, path: str) -> Response:
        return await target.passthrough(request)

    return app


def _check_arguments(
    upstream: Any,
    *,
    retry: Any,
    timeout: Any,
    native_n: Any,
    sampling_temperature: Any,
    keys: dict[str, Any],
    counts: dict[str, Any],
) -> None:
    """:func:`create_proxy_app`'s arguments checked, each failure naming the argument."""
    if not isinstance(upstream, str) or not upstream:
        raise ValueError("upstream must be the upstream's base URL, e.g. https://api.openai.com/v1")
    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"upstream must be an http:// or https:// base URL such as "
            f"https://api.openai.com/v1; got {upstream!r}"
        )
    if parts.username is not None or parts.password is not None:
        # httpx would send them as Basic auth in place of the client's Authorization header.
        raise ValueError(
            f"upstream must not carry a user name or password ({parts.scheme}://...@"
            f"{parts.hostname}): clients' own Authorization headers go upstream as they are; "
            "for a key the proxy sends itself, use upstream_api_key (--upstream-api-key)"
        )
    for name, value in counts.items():
        check_positive_int(value, name)
    if counts["n"] > counts["max_n"]:
        raise ValueError(f"n must be at most max_n ({counts['max_n']}); got {counts['n']}")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0; got {timeout!r}")
    if not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a capplug RetryPolicy; got {type(retry).__name__}")
    if native_n not in ("auto", "never"):
        raise ValueError(f"native_n must be 'auto' or 'never'; got {native_n!r}")
    if sampling_temperature is not None and not (
        isinstance(sampling_temperature, int | float) and 0 < sampling_temperature <= 2
    ):
        raise ValueError(
            f"sampling_temperature must be in (0, 2], or None to keep temperature 0; "
            f"got {sampling_temperature!r}"
        )
    for name, key in keys.items():
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise ValueError(f"{name} must be a non-empty string, or None for no key")
