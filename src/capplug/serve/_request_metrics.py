"""Prometheus metrics every capplug server can share: requests by route and status, their time,
and those in flight, counted by an ASGI middleware (refused and oversized requests included)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

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
    """Count and time every HTTP request into ``metrics`` (anything with ``requests`` and
    ``request_seconds`` labelled by one label and status, and ``in_flight``).

    Subclasses choose the label (:meth:`label`; ``None`` leaves a request uncounted) and may
    change the response's start message (:meth:`starting`), e.g. to add a header.
    """

    def __init__(self, app: ASGIApp, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    def label(self, scope: Scope) -> str | None:
        """The request's label (its route template, by default)."""
        return self.metrics.route(scope["path"])

    def starting(self, scope: Scope, message: Message, started: float) -> Message:
        """The ``http.response.start`` message as it is sent (unchanged, by default)."""
        return message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        label = self.label(scope) if scope["type"] == "http" else None
        if label is None:
            await self.app(scope, receive, send)
            return
        status = 500  # what an app that fails before answering amounts to
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = self.starting(scope, message, started)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
