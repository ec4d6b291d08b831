"""Prometheus metrics every capplug server can share: requests by route and status, their time,
and those in flight, counted by an ASGI middleware (refused and oversized requests included)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CountRequests", "RequestMetrics"]


class RequestMetrics:
    """Request counters in a registry of their own (one per app), named ``<prefix>_...``."""

    def __init__(self, prefix: str, routes: Sequence[tuple[str, str]]) -> None:
        self.registry = CollectorRegistry()
        self._routes = [(re.compile(pattern), name) for pattern, name in routes]
        self.requests = Counter(
            f"{prefix}_requests",
            "Requests answered, by route and HTTP status",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            f"{prefix}_request_seconds",
            "Time to answer a request, by route",
            ["route"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_requests_in_flight", "Requests being answered", registry=self.registry
        )

    def route(self, path: str) -> str:
        """The route template a path belongs to (ids left out, so labels stay few)."""
        for pattern, name in self._routes:
            if pattern.fullmatch(path):
                return name
        return "other"


class CountRequests:
    """Count and time every HTTP request into a :class:`RequestMetrics`."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.metrics.route(scope["path"])
        status = 500  # what an app that fails before answering amounts to
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
