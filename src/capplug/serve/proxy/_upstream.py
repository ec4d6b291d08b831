"""The proxy's side of the upstream: its connections, retried calls, forwarded headers, the
pass-through, and an upstream's failure as the client sees it."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers

from capplug.llms.collect import describe_error
from capplug.llms.retry import (
    AttemptBudget,
    AttemptsSpent,
    RetryEvent,
    RetryPolicy,
    UpstreamHTTPError,
    is_retryable,
    status_of,
)
from capplug.serve._http import APIError, error_response
from capplug.serve.proxy._metrics import ProxyMetrics, failure_reason, is_timeout
from capplug.serve.proxy._replies import chat_completion, is_event_stream

T = TypeVar("T")

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


class UpstreamFailure(Exception):
    """An upstream call that failed for good: the last error and how many attempts it took."""

    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(describe_error(error))
        self.error = error
        self.attempts = attempts
        self.calls = 1  # how many calls failed like this (a fan-out where every call failed)
        # Read by capplug.llms.retry (is_retryable, status_of) as the error's own.
        self.is_retryable = is_retryable(error)
        self.status_code = status_of(error)


class Relayed(Exception):
    """The upstream's own error answer, to be sent back with its status."""

    def __init__(self, error: UpstreamHTTPError) -> None:
        super().__init__(str(error))
        self.error = error


async def on_relayed(request: Request, exc: Exception) -> Response:
    """The app's handler for :class:`Relayed`: the upstream's error body, as it came."""
    assert isinstance(exc, Relayed)
    error = exc.error
    body = error.body
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        return JSONResponse(dict(body), status_code=error.status)
    return error_response(error.status, f"the upstream refused the request: {error}")


class Upstream:
    """One upstream as the proxy reaches it: its client, retries, headers and error answers."""

    def __init__(
        self,
        upstream: str,
        *,
        metrics: ProxyMetrics,
        retry: RetryPolicy,
        timeout: float,
        upstream_api_key: str | None,
        max_connections: int,
        transport: httpx2.AsyncBaseTransport | None,
    ) -> None:
        parts = urlsplit(upstream)
        self.base = upstream.rstrip("/")
        # Named in errors and logs (create_proxy_app refuses a URL with userinfo).
        self.name = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self.chat_url = f"{self.base}/chat/completions"
        self.responses_url = f"{self.base}/responses"
        self.timeout = timeout
        self.upstream_api_key = upstream_api_key
        self.max_connections = max_connections
        self.transport = transport
        self.metrics = metrics
        self.retry = retry.with_options(on_retry=self._counting(retry.on_retry))
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

        return await self._retried(attempt, budget)

    async def open_stream(
        self, payload: dict[str, Any], headers: list[tuple[str, str]], budget: AttemptBudget
    ) -> httpx2.Response:
        """A streamed chat completion, opened with :meth:`call`'s retries: its status and
        headers read, its body not yet (the caller closes it). An error status raises, retried
        where worth it, before a byte of the body is relayed; an answer that is not a stream
        (an upstream that ignores ``stream``) comes read, checked as :meth:`call` checks it."""
        content = json.dumps(payload, ensure_ascii=False).encode()
        opened: list[httpx2.Response] = []

        async def attempt() -> httpx2.Response:
            async with budget.attempt():
                self.metrics.upstream_requests.labels("rerank").inc()
                client = self.client()
                sent = client.build_request("POST", self.chat_url, content=content, headers=headers)
                response = await client.send(sent, stream=True)
                if is_event_stream(response) and response.status_code < 400:
                    opened.append(response)
                    return response
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                chat_completion(response)  # raises for an error status or a body that is not one
                return response

        try:
            return await self._retried(attempt, budget)
        except BaseException:
            for response in opened:  # opened, then cancelled (the client left) on the way out
                await response.aclose()
            raise

    async def _retried(self, attempt: Callable[[], Awaitable[T]], budget: AttemptBudget) -> T:
        """``attempt()`` under the retry policy; an :class:`UpstreamFailure` when it fails for good."""
        try:
            return await self.retry.acall(attempt)
        except AttemptsSpent as spent:
            # Not attempted at all: the request's other calls spent its attempts.
            error = spent.last or spent
            raise UpstreamFailure(error, budget.started) from error
        except Exception as error:
            self.metrics.upstream_failures.labels(failure_reason(error)).inc()
            raise UpstreamFailure(error, budget.started) from error

    def error(self, failure: UpstreamFailure) -> APIError | Relayed:
        """What the client gets for an upstream call that failed for good."""
        error = failure.error
        if (
            isinstance(error, UpstreamHTTPError)
            and 400 <= error.status < 500
            and not error.retryable
        ):
            # The upstream refused the request itself (bad model, bad key, ...): its answer, as is.
            return Relayed(error)
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
        if isinstance(error, UpstreamHTTPError) and error.status == 429:
            # Rate limited for good: the client sees a rate limit (the SDKs' RateLimitError),
            # with the upstream's Retry-After, so its own rate-limit handling can wait.
            return APIError(
                429, message, code="rate_limit_exceeded", kind="rate_limit_error", headers=headers
            )
        return APIError(
            504 if timed_out else 502,
            message,
            code="upstream_timeout" if timed_out else "upstream_error",
            headers=headers,
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
