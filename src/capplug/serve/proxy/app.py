"""The reranking proxy: :func:`create_proxy_app` and the routes behind it (docs/proxy.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.background import BackgroundTask
from starlette.datastructures import Headers

from capplug.feedback import as_feedback_store
from capplug.llms.collect import Collected, acollect, describe_error, names_parameter
from capplug.llms.retry import (
    DEFAULT_RETRY,
    AttemptBudget,
    AttemptsSpent,
    RetryEvent,
    RetryPolicy,
    UpstreamHTTPError,
    is_retryable,
    status_of,
)
from capplug.selection import (
    TOOL_CALLS_UNSCORED,
    choose,
    combiner_of,
    distinct,
    openai_logprobs,
    tool_call_order,
    unscored_metadata,
)
from capplug.serve._feedback import install_feedback_routes
from capplug.serve._http import (
    BEARER,
    APIError,
    BodyLimit,
    ClientGone,
    KeyHeader,
    RequireKey,
    SafePath,
    check_positive_int,
    error_response,
    install_error_handlers,
    read_json_object,
    unless_disconnected,
)
from capplug.serve._scoring_queue import ScoringQueue
from capplug.serve.proxy._metrics import (
    TIMING_KEY,
    Metered,
    ProxyMetrics,
    failure_reason,
    is_timeout,
)
from capplug.serve.proxy._replies import (
    Replies,
    candidate_text,
    chat_completion,
    completion_chunks,
    has_tool_calls,
    single_request,
    summed_usage,
)
from capplug.serve.proxy._requests import (
    CHAT_PATH,
    choices_wanted,
    header_count,
    header_flag,
    instruction_of,
    rerank_request,
    score_request,
    stream_flag,
)
from capplug.serve.proxy._responses import (
    RESPONSES_PATH,
    as_choice,
    passthrough_reason,
    response_object,
    responses_instruction,
)

__all__ = ["KEY_HEADER", "create_proxy_app"]


logger = logging.getLogger("capplug.serve.proxy")


T = TypeVar("T")


KEY_HEADER = "X-Capplug-Key"
"""The header that carries the proxy's own API key (``Authorization`` belongs to the upstream)."""


# Cohere's v1 and v2 clients, Jina's, vLLM's and LangChain's or LlamaIndex's Cohere rerankers.
_RERANK_PATHS = ("/v1/rerank", "/v2/rerank")


_SCORE_PATH = "/v1/score"  # vLLM's


_PROXY_KEY = KeyHeader(KEY_HEADER)


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


# Headers that describe a body the proxy re-encodes (reranked requests and their answers).
_BODY_HEADERS = frozenset({"content-length", "content-type", "content-encoding", "accept-encoding"})


_MAX_REMEMBERED_MODELS = 1024


# How long a model's quirk (no native n, no logprobs) is believed before it is tried again: one
# short reply or one transient 400 costs minutes of single requests, not the process's lifetime.
_QUIRK_SECONDS = 600.0


@dataclass
class _Selection:
    order: list[int]
    """Every candidate's index, in the order to return them: the chosen one first."""
    metadata: dict[str, Any]
    """The selection core's metadata (scores, signals and weights, or ``reason`` when unscored)."""
    seconds: float = 0.0


class _UpstreamFailure(Exception):
    """An upstream call that failed for good: the last error and how many attempts it took."""

    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(describe_error(error))
        self.error = error
        self.attempts = attempts
        self.calls = 1  # how many calls failed like this (a fan-out where every call failed)
        # Read by capplug.llms.retry (is_retryable, status_of) as the error's own.
        self.is_retryable = is_retryable(error)
        self.status_code = status_of(error)


class _Quirks:
    """What the upstream was seen not to support, per model, believed for ``seconds`` only.

    Each new entry is logged at WARNING (the log a ``capplug proxy`` operator sees), and so is
    nothing else: an entry that runs out is simply tried again, and remembered again if the
    upstream still does not support it.
    """

    def __init__(
        self,
        upstream: str,
        consequence: str,
        *,
        seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.consequence = consequence
        self.seconds = _QUIRK_SECONDS if seconds is None else seconds
        self.clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, model: object) -> bool:
        until = self._until.get(model)  # type: ignore[call-overload]
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[model]  # type: ignore[arg-type]
            return False
        return True

    def remember(self, model: str, why: str) -> None:
        if model in self:
            return
        logger.warning(
            "the upstream %s %s for model %r; %s for the next %d s",
            self.upstream,
            why,
            model,
            self.consequence,
            round(self.seconds),
        )
        self._until[model] = self.clock() + self.seconds
        while len(self._until) > _MAX_REMEMBERED_MODELS:
            self._until.popitem(last=False)


class _Proxy:
    """The state behind one proxy app: upstream client, scorer, policy, metrics."""

    def __init__(
        self,
        upstream: str,
        *,
        scorer: Any,
        n: int,
        max_n: int,
        retry: RetryPolicy,
        timeout: float,
        upstream_api_key: str | None,
        native_n: Literal["auto", "never"],
        sampling_temperature: float | None,
        max_connections: int,
        transport: httpx2.AsyncBaseTransport | None,
        request_logprobs: bool = True,
        feedback: Any = None,
    ) -> None:
        parts = urlsplit(upstream)
        self.base = upstream.rstrip("/")
        # Named in errors and logs (create_proxy_app refuses a URL with userinfo).
        self.name = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self.chat_url = f"{self.base}/chat/completions"
        self.responses_url = f"{self.base}/responses"
        self.n = n
        self.max_n = max_n
        self.timeout = timeout
        self.upstream_api_key = upstream_api_key
        self.native_n = native_n
        self.sampling_temperature = sampling_temperature
        self.max_connections = max_connections
        self.transport = transport
        self.metrics = ProxyMetrics()
        self.scoring = ScoringQueue(scorer)
        self.feedback = feedback
        self.combiner = combiner_of(scorer)
        self.retry = retry.with_options(on_retry=self._counting(retry.on_retry))
        self._ignores_n = _Quirks(self.name, "asking for one candidate per request")
        self.request_logprobs = request_logprobs
        self._refuses_logprobs = _Quirks(self.name, "not asking for logprobs")
        self._client: httpx2.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _counting(
        self, chained: Callable[[RetryEvent], None] | None
    ) -> Callable[[RetryEvent], None]:
        def on_retry(event: RetryEvent) -> None:
            self.metrics.upstream_retries.labels(failure_reason(event.error)).inc()
            if chained is not None:
                chained(event)

        return on_retry

    # ------------------------------------------------------------------ upstream plumbing

    def client(self) -> httpx2.AsyncClient:
        """The upstream client of the running event loop (connections belong to one loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx2.AsyncClient(
                timeout=httpx2.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                limits=httpx2.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                ),
                transport=self.transport,
                follow_redirects=False,
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def url(self, path: str, query: str) -> str:
        rest = path.removeprefix("/v1")
        return f"{self.base}{rest}" + (f"?{query}" if query else "")

    def forward_headers(self, headers: Headers, *, reencoded: bool) -> list[tuple[str, str]]:
        """The client's headers as they go upstream: hop-by-hop and ``X-Capplug-*`` dropped."""
        out = []
        for raw_name, raw_value in headers.raw:
            name = raw_name.decode("latin-1").lower()
            if name in _HOP_BY_HOP or name.startswith("x-capplug-"):
                continue
            if reencoded and name in _BODY_HEADERS:
                continue
            if name == "authorization" and self.upstream_api_key is not None:
                continue
            out.append((name, raw_value.decode("latin-1")))
        if self.upstream_api_key is not None:
            out.append(("authorization", f"Bearer {self.upstream_api_key}"))
        if reencoded:
            out.append(("content-type", "application/json"))
        return out

    # ------------------------------------------------------------------ candidates

    async def call(
        self,
        payload: dict[str, Any],
        headers: list[tuple[str, str]],
        budget: AttemptBudget,
        *,
        url: str | None = None,
        parse: Callable[[httpx2.Response], dict[str, Any]] = chat_completion,
    ) -> tuple[dict[str, Any], httpx2.Headers]:
        """One upstream call (chat completions unless ``url`` says otherwise), retried within
        the request's attempt budget; ``parse`` reads the answer or raises."""
        content = json.dumps(payload, ensure_ascii=False).encode()

        async def attempt() -> tuple[dict[str, Any], httpx2.Headers]:
            async with budget.attempt():
                self.metrics.upstream_requests.labels("rerank").inc()
                response = await self.client().post(
                    url or self.chat_url, content=content, headers=headers
                )
                return parse(response), response.headers

        try:
            return await self.retry.acall(attempt)
        except AttemptsSpent as spent:
            # Not attempted at all: the request's other calls spent its attempts.
            error = spent.last or spent
            raise _UpstreamFailure(error, budget.started) from error
        except Exception as error:
            self.metrics.upstream_failures.labels(failure_reason(error)).inc()
            raise _UpstreamFailure(error, budget.started) from error

    async def collect(
        self,
        payload: dict[str, Any],
        headers: list[tuple[str, str]],
        n: int,
        model: str,
        budget: AttemptBudget,
    ) -> tuple[Collected[dict[str, Any]], Replies]:
        """``n`` candidates by capplug's one policy (:mod:`capplug.llms.collect`); a model known
        to refuse or ignore ``n`` gets single requests only. Raises when none arrived."""
        replies = Replies()

        async def call(count: int | None, k: int) -> list[dict[str, Any]]:
            body = {**payload, "n": count} if count else single_request(payload, k)
            reply, reply_headers = await self.call(body, headers, budget)
            replies.add(reply, reply_headers)
            return reply["choices"][: count or 1]

        native = self.native_n == "auto" and model not in self._ignores_n
        collected = await acollect(call, n, native=native, max_concurrency=None)
        if collected.refused is not None:
            self._ignores_n.remember(model, f"refused n={n} ({describe_error(collected.refused)})")
        elif collected.native and collected.native_count < 2:
            self._ignores_n.remember(model, f"answered n={n} with one choice")
        return _received_or_raise(collected), replies

    async def collect_responses(
        self, payload: dict[str, Any], headers: list[tuple[str, str]], n: int, budget: AttemptBudget
    ) -> tuple[Collected[dict[str, Any]], Replies]:
        """``n`` Responses-API candidates: single requests (the API has no ``n``)."""
        replies = Replies()

        async def call(_count: int | None, _k: int) -> list[dict[str, Any]]:
            reply, reply_headers = await self.call(
                payload, headers, budget, url=self.responses_url, parse=response_object
            )
            replies.add(reply, reply_headers)
            return [reply]

        collected = await acollect(call, n, native=False, max_concurrency=None)
        return _received_or_raise(collected), replies

    async def select(self, instruction: str, choices: list[dict[str, Any]]) -> _Selection:
        """The selection core's choice among ``choices``, and the order to return them in."""
        texts = [candidate_text(c) for c in choices]
        order = tool_call_order([has_tool_calls(c) for c in choices])
        if order is not None:
            return _Selection(order, unscored_metadata(texts, order, TOOL_CALLS_UNSCORED))
        unique, where = distinct(texts)
        started = time.perf_counter()
        try:
            unique_scores = await self.scoring.score(instruction, unique)
        except Exception as error:
            seconds = time.perf_counter() - started
            self.metrics.scoring_failures.inc()
            logger.error("scoring failed; answering unscored: %s", describe_error(error))
            reason = (
                f"scoring failed ({describe_error(error)}); candidates are in the order received"
            )
            order = list(range(len(choices)))
            return _Selection(order, unscored_metadata(texts, order, reason), seconds)
        scores = np.array([unique_scores[j] for j in where], dtype=float)
        found = [openai_logprobs(c.get("logprobs")) for c in choices]
        have = all(f is not None for f in found)
        chosen = choose(
            texts,
            scores=scores if np.all(np.isfinite(scores)) else None,
            logprobs=np.array([f[0] for f in found]) if have else None,  # type: ignore[index]
            token_counts=np.array([f[1] for f in found]) if have else None,  # type: ignore[index]
            instruction=instruction,
            combiner=self.combiner,
        )
        seconds = time.perf_counter() - started
        self.metrics.scoring_seconds.observe(seconds)
        return _Selection(chosen.order(), chosen.metadata(), seconds)

    # ------------------------------------------------------------------ routes

    async def chat_completions(self, request: Request) -> Response:
        if header_flag(request.headers, "X-Capplug-Disable"):
            return await self.passthrough(request)
        body = read_json_object(
            await request.body(),
            what="a JSON object with 'messages' (and Content-Type: application/json)",
        )
        # A client that goes away takes its upstream calls, retries and scoring with it.
        return await unless_disconnected(request, self._rerank(request, body))

    async def _rerank(self, request: Request, body: dict[str, Any]) -> Response:
        instruction = instruction_of(body)
        want = choices_wanted(body, self.max_n)
        asked_n = header_count(request.headers, "X-Capplug-N", self.max_n)
        # A request that offers tools is an agent step whose candidates would call tools, and
        # tool calls are not scored: sampling n of them costs n calls for nothing, so it gets
        # the one the client asked for, unless X-Capplug-N asks for more.
        offers_tools = bool(body.get("tools") or body.get("functions"))
        n = max(want, asked_n or (1 if offers_tools else self.n))
        stream, include_usage = stream_flag(body)
        payload = self._sampled(
            {k: v for k, v in body.items() if k not in ("n", "stream", "stream_options")}, n
        )
        model = body.get("model")
        headers = self.forward_headers(request.headers, reencoded=True)

        model_name = model if isinstance(model, str) else ""
        client_logprobs = body.get("logprobs") is True
        ask_logprobs = (
            self.request_logprobs
            and "logprobs" not in body
            and model_name not in self._refuses_logprobs
        )
        if ask_logprobs:
            payload["logprobs"] = True  # a selection signal; stripped again below
        started = time.perf_counter()
        # Every upstream attempt this request makes (fan-out, retries, the ask without logprobs)
        # comes out of one budget, so a lasting failure costs the configured attempts, not more.
        budget = AttemptBudget(self.retry.max_attempts)
        try:
            collected, replies = await self.collect(payload, headers, n, model_name, budget)
        except _UpstreamFailure as failure:
            if not (ask_logprobs and names_parameter(failure.error, "logprobs")):
                raise self._upstream_error(failure) from failure
            # Perhaps the logprobs we added: ask once more without them, as the client did.
            payload.pop("logprobs")
            try:
                collected, replies = await self.collect(payload, headers, n, model_name, budget)
            except _UpstreamFailure as again:
                raise self._upstream_error(again) from again
            self._refuses_logprobs.remember(
                model_name, f"refused logprobs ({describe_error(failure.error)})"
            )
        choices = collected.received
        reason = None
        if offers_tools and n == 1:
            reason = (
                "the request offers tools: one candidate, since tool calls are not scored "
                "(X-Capplug-N asks for more)"
            )
        order, meta, headers_out = await self._choose(
            request,
            instruction,
            collected,
            replies,
            choices,
            n=n,
            want=want,
            model=model_name,
            started=started,
            reason=reason,
        )
        usage = summed_usage(replies.replies)
        returned = [{**choices[i], "index": j} for j, i in enumerate(order)]
        if not client_logprobs:
            returned = [{**c, "logprobs": None} for c in returned]
        first = replies.replies[0]
        if stream:
            return StreamingResponse(
                completion_chunks(first, returned, usage, meta, include_usage=include_usage),
                media_type="text/event-stream",
                headers={**headers_out, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completion = {k: v for k, v in first.items() if k not in ("choices", "usage")}
        completion.update(choices=returned, usage=usage, capplug=meta)
        return JSONResponse(completion, headers=headers_out)

    async def responses(self, request: Request) -> Response:
        """``POST /v1/responses``: reranked like a chat completion where it can be (see
        ``_responses``), else passed through with ``X-Capplug-Passthrough`` saying why."""
        if header_flag(request.headers, "X-Capplug-Disable"):
            return await self.passthrough(request)
        body = read_json_object(await request.body(), what="a JSON object with 'input'")
        reason = passthrough_reason(body)
        if reason is not None:
            logger.debug("passing a Responses request through unreranked: %s", reason)
            relayed = await self.passthrough(request)
            relayed.headers["X-Capplug-Passthrough"] = reason
            return relayed
        return await unless_disconnected(request, self._rerank_response(request, body))

    async def _rerank_response(self, request: Request, body: dict[str, Any]) -> Response:
        instruction = responses_instruction(body)
        n = header_count(request.headers, "X-Capplug-N", self.max_n) or self.n
        payload = self._sampled(dict(body), n)
        headers = self.forward_headers(request.headers, reencoded=True)
        budget = AttemptBudget(self.retry.max_attempts)
        started = time.perf_counter()
        try:
            collected, replies = await self.collect_responses(payload, headers, n, budget)
        except _UpstreamFailure as failure:
            raise self._upstream_error(failure) from failure
        model = body.get("model")
        order, meta, headers_out = await self._choose(
            request,
            instruction,
            collected,
            replies,
            [as_choice(r) for r in collected.received],
            n=n,
            want=1,
            model=model if isinstance(model, str) else "",
            started=started,
        )
        chosen = collected.received[order[0]]
        usage = summed_usage(replies.replies)
        answer = {**chosen, **({"usage": usage} if usage is not None else {}), "capplug": meta}
        return JSONResponse(answer, headers=headers_out)

    def _sampled(self, payload: dict[str, Any], n: int) -> dict[str, Any]:
        """``payload`` with temperature 0 raised to ``sampling_temperature`` when several
        candidates are drawn (greedy ones would all be the same)."""
        temperature = payload.get("temperature")
        if (
            n > 1
            and self.sampling_temperature is not None
            and isinstance(temperature, int | float)
            and temperature == 0
        ):
            payload["temperature"] = self.sampling_temperature
        return payload

    async def _choose(
        self,
        request: Request,
        instruction: str,
        collected: Collected[dict[str, Any]],
        replies: Replies,
        choices: list[dict[str, Any]],
        *,
        n: int,
        want: int,
        model: str,
        started: float,
        reason: str | None = None,
    ) -> tuple[list[int], dict[str, Any], dict[str, str]]:
        """Choose among one request's candidates: the order to return them in (``want`` of
        them), the ``capplug`` metadata, and the headers that say the same. Counts and times
        the request, records the selection for feedback, and leaves the timings for
        ``Server-Timing``."""
        upstream_seconds = time.perf_counter() - started
        self.metrics.upstream_seconds.observe(upstream_seconds)
        self.metrics.candidates.inc(len(choices))
        self.metrics.candidate_failures.inc(len(collected.failures))
        if collected.failures:
            logger.warning(
                "%d of %d candidate requests to %s failed; choosing among the %d candidates "
                "received (%s)",
                len(collected.failures),
                collected.calls,
                self.name,
                len(choices),
                describe_error(collected.failures[-1]),
            )
        selection = await self.select(instruction, choices)
        if reason is not None:
            selection.metadata["reason"] = reason
        order = selection.order[:want]
        if self.feedback is not None and selection.metadata["scores"] is not None:
            selection.metadata["selection_id"] = await self._record(
                instruction, selection.metadata, model
            )
        meta = {
            **collected.metadata(n),
            **selection.metadata,
            "returned": order,
            "upstream_seconds": round(upstream_seconds, 6),
            "scoring_seconds": round(selection.seconds, 6),
        }
        setattr(
            request.state,
            TIMING_KEY,
            [("upstream", upstream_seconds), ("scoring", selection.seconds)],
        )
        logger.debug(
            "reranked %d candidates from %s: returned %s (upstream %.3f s, scoring %.3f s)",
            len(choices),
            self.name,
            order,
            upstream_seconds,
            selection.seconds,
        )
        headers = {
            **replies.headers,
            "X-Capplug-Candidates": str(len(choices)),
            "X-Capplug-Failures": str(len(collected.failures)),
        }
        return order, meta, headers

    async def _record(self, instruction: str, chosen: dict[str, Any], model: str) -> str | None:
        """Store a reranked answer's selection for feedback; its id, or None if storing failed
        (the answer goes out either way)."""
        try:
            return await asyncio.to_thread(
                self.feedback.record,
                instruction,
                chosen["candidates"],
                chosen["chosen"],
                scores=chosen["scores"],
                surface="proxy",
                model=model or None,
            )
        except Exception as error:
            logger.error("could not record the selection for feedback: %s", describe_error(error))
            return None

    def _upstream_error(self, failure: _UpstreamFailure) -> APIError | _Relayed:
        error = failure.error
        if (
            isinstance(error, UpstreamHTTPError)
            and 400 <= error.status < 500
            and not error.retryable
        ):
            # The upstream refused the request itself (bad model, bad key, ...): its answer, as is.
            return _Relayed(error)
        timed_out = is_timeout(error)
        tries = f"{failure.attempts} attempt" + ("s" if failure.attempts != 1 else "")
        if failure.calls > 1:
            what = f"all {failure.calls} candidate requests failed ({tries} in all)"
        else:
            what = f"failed after {tries}"
        message = f"the upstream {self.name} {what}: {describe_error(error)}"
        retry_after = error.retry_after if isinstance(error, UpstreamHTTPError) else None
        # The proxy has already retried as configured: a client SDK retrying too would multiply
        # the attempts (the openai SDKs obey this header).
        headers = {"x-should-retry": "false"}
        if retry_after:
            headers["Retry-After"] = str(math.ceil(retry_after))
        return APIError(
            504 if timed_out else 502,
            message,
            code="upstream_timeout" if timed_out else "upstream_error",
            headers=headers,
        )

    async def _scored(self, request: Request, work: Awaitable[T], what: str) -> T:
        """The scores ``work`` gives, for a route the proxy answers itself: cancelled if the
        client leaves, timed (metrics, ``Server-Timing``), and a 503 if the scorer fails."""
        started = time.perf_counter()
        try:
            result = await unless_disconnected(request, work)
        except ClientGone:
            raise
        except Exception as error:
            self.metrics.scoring_failures.inc()
            logger.error("scoring failed for a %s request: %s", what, describe_error(error))
            raise APIError(
                503, f"the scorer failed: {describe_error(error)}", code="scorer_unavailable"
            ) from error
        seconds = time.perf_counter() - started
        self.metrics.scoring_seconds.observe(seconds)
        setattr(request.state, TIMING_KEY, [("scoring", seconds)])
        return result

    async def rerank(self, request: Request) -> Response:
        """``POST /v1/rerank`` (Cohere, Jina, vLLM shape): the documents by the scorer's score."""
        body = read_json_object(
            await request.body(), what="a JSON object with 'query' and 'documents'"
        )
        query, texts, top_n, return_documents = rerank_request(body)
        scores = await self._scored(request, self.scoring.score(query, texts), "rerank")
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]  # stable on ties
        results: list[dict[str, Any]] = []
        for i in order:
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if return_documents:
                result["document"] = {"text": texts[i]}
            results.append(result)
        model = body.get("model")
        return JSONResponse(
            {
                "id": f"rerank-{secrets.token_hex(12)}",
                "object": "rerank",
                "model": model if isinstance(model, str) and model else "capplug-scorer",
                "results": results,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            }
        )

    async def score(self, request: Request) -> Response:
        """``POST /v1/score`` (vLLM's shape): the scorer's score of each (text_1, text_2) pair."""
        body = read_json_object(
            await request.body(), what="a JSON object with 'text_1' and 'text_2'"
        )
        pairs = score_request(body)
        by_instruction: dict[str, list[int]] = {}
        for i, (instruction, _) in enumerate(pairs):
            by_instruction.setdefault(instruction, []).append(i)

        async def scored() -> list[list[float]]:
            return list(
                await asyncio.gather(
                    *(
                        self.scoring.score(instruction, [pairs[i][1] for i in indices])
                        for instruction, indices in by_instruction.items()
                    )
                )
            )

        groups = await self._scored(request, scored(), "score")
        scores = [0.0] * len(pairs)
        for indices, values in zip(by_instruction.values(), groups, strict=True):
            for i, value in zip(indices, values, strict=True):
                scores[i] = value
        model = body.get("model")
        return JSONResponse(
            {
                "id": f"score-{secrets.token_hex(12)}",
                "object": "list",
                "created": int(time.time()),
                "model": model if isinstance(model, str) and model else "capplug-scorer",
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            }
        )

    async def passthrough(self, request: Request) -> Response:
        """Forward the request as it came and stream the upstream's answer back as it comes."""
        headers = self.forward_headers(request.headers, reencoded=False)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        client = self.client()
        upstream_request = client.build_request(
            request.method,
            self.url(request.url.path, request.url.query),
            headers=headers,
            content=request.stream() if has_body else None,
        )
        self.metrics.upstream_requests.labels("passthrough").inc()
        try:
            response = await client.send(upstream_request, stream=True)
        except httpx2.TransportError as error:
            self.metrics.upstream_failures.labels(failure_reason(error)).inc()
            timed_out = is_timeout(error)
            raise APIError(
                504 if timed_out else 502,
                f"the upstream {self.name} did not answer: {describe_error(error)}",
                code="upstream_timeout" if timed_out else "upstream_error",
            ) from error
        relayed = StreamingResponse(
            _raw_body(response),
            status_code=response.status_code,
            background=BackgroundTask(response.aclose),
        )
        relayed.raw_headers = [
            (name.lower(), value)
            for name, value in response.headers.raw
            if name.lower().decode("latin-1") not in _HOP_BY_HOP
        ]
        return relayed


async def _raw_body(response: httpx2.Response) -> AsyncIterator[bytes]:
    """The upstream's body as it came off the wire, still encoded; the response closed after."""
    try:
        try:
            content = response.content  # a transport that hands over a read body (tests' mocks)
        except httpx2.ResponseNotRead:
            async for chunk in response.aiter_raw():
                yield chunk
            return
        yield content
    finally:
        # Also when the client goes away mid-stream: the connection goes back to the pool.
        await response.aclose()


def _received_or_raise(collected: Collected[Any]) -> Collected[Any]:
    """``collected`` with its failures unwrapped; the last failure raised when none arrived."""
    if not collected.received:
        last = collected.failures[-1]
        failure = last if isinstance(last, _UpstreamFailure) else _UpstreamFailure(last, 0)
        failure.calls = len(collected.failures)
        raise failure
    collected.failures = [
        f.error if isinstance(f, _UpstreamFailure) else f for f in collected.failures
    ]
    return collected


class _Relayed(Exception):
    """The upstream's own error answer, to be sent back with its status."""

    def __init__(self, error: UpstreamHTTPError) -> None:
        super().__init__(str(error))
        self.error = error


async def _on_relayed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Relayed)
    error = exc.error
    body = error.body
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        return JSONResponse(dict(body), status_code=error.status)
    return error_response(error.status, f"the upstream refused the request: {error}")


def _key_headers(path: str) -> list[KeyHeader]:
    """Where the proxy's key is asked for, and in which headers (``Authorization`` too on the
    routes the proxy answers itself, where no upstream key is at stake)."""
    if path == "/healthz":
        return []
    if path == "/metrics" or path in _RERANK_PATHS or path == _SCORE_PATH:
        return [_PROXY_KEY, BEARER]
    return [_PROXY_KEY]


def _load_scorer(scorer: Any) -> Any:
    if isinstance(scorer, str | os.PathLike):
        from capplug.scoring import Scorer

        return Scorer.from_pretrained(scorer)
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(
            "scorer must be a capplug Scorer (or have .score(instruction, responses)), or a "
            f"scorer reference such as a folder; got {type(scorer).__name__}"
        )
    return scorer


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
    """
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
    for value, name in (
        (n, "n"),
        (max_n, "max_n"),
        (max_body_bytes, "max_body_bytes"),
        (max_connections, "max_connections"),
    ):
        check_positive_int(value, name)
    if n > max_n:
        raise ValueError(f"n must be at most max_n ({max_n}); got {n}")
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
    for key, name in ((api_key, "api_key"), (upstream_api_key, "upstream_api_key")):
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise ValueError(f"{name} must be a non-empty string, or None for no key")

    proxy = _Proxy(
        upstream,
        scorer=_load_scorer(scorer),
        n=n,
        max_n=max_n,
        retry=retry,
        timeout=float(timeout),
        upstream_api_key=upstream_api_key,
        native_n=native_n,
        sampling_temperature=sampling_temperature,
        max_connections=max_connections,
        transport=transport,
        request_logprobs=bool(request_logprobs),
        feedback=as_feedback_store(feedback),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await proxy.aclose()

    app = FastAPI(
        title="capplug reranking proxy",
        summary=f"OpenAI-compatible; chat completions from {proxy.name} reranked by capplug.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.add_exception_handler(_Relayed, _on_relayed)
    app.add_middleware(SafePath)  # innermost: no route sees a path out of its base
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key, headers_for=_key_headers, what="proxy key")
    # Outermost: refused and oversized requests are counted too.
    app.add_middleware(Metered, metrics=proxy.metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(CHAT_PATH, response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await proxy.chat_completions(request)

    for path in _RERANK_PATHS:
        app.add_api_route(path, proxy.rerank, methods=["POST"], response_model=None)
    app.add_api_route(_SCORE_PATH, proxy.score, methods=["POST"], response_model=None)
    install_feedback_routes(app, proxy.feedback)
    app.add_api_route(RESPONSES_PATH, proxy.responses, methods=["POST"], response_model=None)

    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        response_model=None,
    )
    async def passthrough(request: Request, path: str) -> Response:
        return await proxy.passthrough(request)

    return app
