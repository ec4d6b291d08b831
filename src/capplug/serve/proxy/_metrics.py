"""The proxy's Prometheus metrics and the middleware that counts and times every request."""

from __future__ import annotations

import time

import httpx2
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from starlette.datastructures import Headers
from starlette.types import Message, Scope

from capplug.llms.retry import (
    UpstreamHTTPError,
)
from capplug.serve._request_metrics import CountRequests
from capplug.serve.proxy._requests import CHAT_PATH, TRUE_VALUES
from capplug.serve.proxy._responses import RESPONSES_PATH

TIMING_KEY = "capplug_timing"  # request.state key: [(name, seconds)] for Server-Timing


class ProxyMetrics:
    """The proxy's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "capplug_proxy_requests",
            "Requests under /v1 answered, by mode (rerank or passthrough) and HTTP status",
            ["mode", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "capplug_proxy_request_seconds",
            "Time to answer a request under /v1, by mode",
            ["mode"],
            registry=r,
        )
        self.in_flight = Gauge(
            "capplug_proxy_requests_in_flight", "Requests under /v1 being answered", registry=r
        )
        self.fanned_out_models = Gauge(
            "capplug_proxy_fanned_out_models",
            "Models the upstream is believed to answer n with one choice, so asked one "
            "candidate per request for now",
            registry=r,
        )
        self.candidates = Counter(
            "capplug_proxy_candidates", "Candidates received from the upstream", registry=r
        )
        self.candidate_failures = Counter(
            "capplug_proxy_candidate_failures",
            "Candidate requests that failed after retries while others succeeded",
            registry=r,
        )
        self.scoring_seconds = Histogram(
            "capplug_proxy_scoring_seconds",
            "Time from handing one request's candidates to the scorer to their scores "
            "(waiting for the scorer included)",
            registry=r,
        )
        self.scoring_failures = Counter(
            "capplug_proxy_scoring_failures",
            "Requests answered unscored because the scorer failed",
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "capplug_proxy_upstream_seconds",
            "Time to collect one request's candidates from the upstream (retries included)",
            registry=r,
        )
        self.upstream_requests = Counter(
            "capplug_proxy_upstream_requests",
            "HTTP requests sent upstream, every attempt counted, by mode",
            ["mode"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "capplug_proxy_upstream_retries",
            "Upstream attempts that failed and were retried, by reason",
            ["reason"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "capplug_proxy_upstream_failures",
            "Upstream calls given up on (retries ran out, or not worth retrying), by reason",
            ["reason"],
            registry=r,
        )


def failure_reason(error: BaseException) -> str:
    """A short, bounded label for an upstream error (metrics)."""
    if isinstance(error, UpstreamHTTPError):
        return str(error.status) if error.status else "invalid_body"
    if is_timeout(error):
        return "timeout"
    if isinstance(error, httpx2.TransportError | ConnectionError):
        return "connection"
    return "error"


def is_timeout(error: BaseException) -> bool:
    return isinstance(error, httpx2.TimeoutException | TimeoutError)


class Metered(CountRequests):
    """Count and time every request under ``/v1`` by mode and status (401s and 413s included).

    Reranked answers also get a ``Server-Timing`` header: the handler leaves its upstream and
    scoring times in the request's state, and the total is taken here, when the answer starts.
    """

    def label(self, scope: Scope) -> str | None:
        if not scope["path"].startswith("/v1"):
            return None
        reranked = scope["method"] == "POST" and scope["path"] in (CHAT_PATH, RESPONSES_PATH)
        if reranked:
            disable = Headers(scope=scope).get("x-capplug-disable", "").strip().lower()
            reranked = disable not in TRUE_VALUES
        scope.setdefault("state", {})  # what ``request.state`` writes into
        return "rerank" if reranked else "passthrough"

    def starting(self, scope: Scope, message: Message, started: float) -> Message:
        timing = scope["state"].get(TIMING_KEY)
        if timing is None:
            return message
        total = time.perf_counter() - started
        parts = [
            *(f"{name};dur={1000 * s:.3f}" for name, s in timing),
            f"total;dur={1000 * total:.3f}",
        ]
        header = (b"server-timing", ", ".join(parts).encode())
        return {**message, "headers": [*message.get("headers", []), header]}
