"""The adapter service's own Prometheus metrics, beside the per-route request counts."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

__all__ = ["ServiceMetrics"]


class ServiceMetrics:
    """What the service itself does, beside the requests: adapters found or made, attached,
    and the generation that answers."""

    def __init__(self, registry: Any) -> None:
        self.lookups = Counter(
            "capplug_adapters_lookups",
            "Chat completions with an instruction, by whether a stored adapter was hit or one made",
            ["result"],
            registry=registry,
        )
        self.attaches = Counter(
            "capplug_adapters_attached",
            "Adapters attached to the model to answer",
            registry=registry,
        )
        self.generation_seconds = Histogram(
            "capplug_adapters_generation_seconds", "Time generating one answer", registry=registry
        )
        self.tokens = Counter(
            "capplug_adapters_completion_tokens", "Tokens generated in answers", registry=registry
        )
        self.fallback = Counter(
            "capplug_adapters_fallback",
            "Answers to requests with an adapter, by fallback mode and the side that answered",
            ["mode", "used"],
            registry=registry,
        )
