"""Candidates from a chat model behind any OpenAI-compatible endpoint (OpenAI, vLLM, TGI, ...).

Used to label scorer training data with a larger model or a remote serving cluster
(``capplug data build --endpoint URL --generator MODEL``). Needs the ``openai`` package
(``pip install 'capplug[openai]'``). Every request goes through capplug's retry policy with the
SDK's own retries off; several choices are asked for in one request (``n``) and topped up by
single requests when an endpoint returns fewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capplug.chat import Instruction, chat_turns
from capplug.llms.collect import collect, seed_for
from capplug.llms.retry import DEFAULT_RETRY, RetryPolicy, without_sdk_retries

__all__ = ["ENDPOINT_RECIPE", "EndpointSampling", "OpenAICompatibleModel"]


@dataclass(frozen=True)
class EndpointSampling:
    """One way of drawing candidates from an endpoint: ``n`` choices at these settings."""

    name: str
    n: int
    temperature: float
    top_p: float | None = None
    extra_body: dict[str, Any] | None = None

    def settings(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in sorted((self.extra_body or {}).items()))
        top_p = f",top_p={self.top_p}" if self.top_p is not None else ""
        return f"{self.name}(temperature={self.temperature}{top_p}{extra})"


ENDPOINT_RECIPE: tuple[EndpointSampling, ...] = (
    EndpointSampling("greedy", 1, 0.0),
    EndpointSampling("sample", 4, 1.0),
    EndpointSampling("temperature", 4, 0.9),
    EndpointSampling("top-p", 4, 1.0, top_p=0.95),
)
"""Cappy's recipe as far as the OpenAI API goes: greedy in place of beam search, and no top-k
(not an OpenAI parameter; add ``EndpointSampling("top-k", 4, 1.0, extra_body={"top_k": 40})``
for vLLM or TGI, which accept it)."""


class OpenAICompatibleModel:
    """A chat model behind an OpenAI-compatible ``/v1/chat/completions``.

    Args:
        model: the model name the endpoint serves.
        base_url: the endpoint (``https://api.openai.com/v1`` when omitted, or ``OPENAI_BASE_URL``).
        api_key: the key (``OPENAI_API_KEY`` when omitted; ``"EMPTY"`` for keyless local servers).
        retry: capplug's retry policy for every request.
        max_concurrency: parallel requests when topping up choices.
        client: an ``openai.OpenAI`` client to use instead of building one.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float = 120.0,
        max_concurrency: int = 8,
        client: Any = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ValueError("model must name the endpoint's model, e.g. 'gpt-4o-mini'")
        if client is None:
            try:
                import openai
            except ImportError as error:
                raise ImportError(
                    "sampling from an endpoint needs the openai package: "
                    "pip install 'capplug[openai]'"
                ) from error
            client = openai.OpenAI(
                base_url=base_url,
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                timeout=timeout,
                max_retries=0,
            )
        self.client = without_sdk_retries(client)
        self.model = model
        self.retry = retry
        self.max_concurrency = max_concurrency
        self.name = f"{model}@{getattr(self.client, 'base_url', base_url)}"

    def __repr__(self) -> str:
        return f"OpenAICompatibleModel({self.name!r})"

    def _request(
        self,
        messages: list[dict[str, str]],
        n: int,
        sampling: EndpointSampling,
        max_tokens: int,
        seed: int | None,
    ) -> list[str]:
        options: dict[str, Any] = {"temperature": sampling.temperature, "max_tokens": max_tokens}
        if n > 1:
            options["n"] = n
        if sampling.top_p is not None:
            options["top_p"] = sampling.top_p
        if seed is not None:
            options["seed"] = seed
        if sampling.extra_body:
            options["extra_body"] = sampling.extra_body
        reply = self.retry.call(
            self.client.chat.completions.create, model=self.model, messages=messages, **options
        )
        return [(choice.message.content or "").strip() for choice in reply.choices]

    def sample(
        self,
        prompt: Instruction,
        sampling: EndpointSampling,
        *,
        max_tokens: int = 64,
        seed: int | None = None,
    ) -> list[str]:
        """``sampling.n`` answers to one prompt; raises when none arrived."""
        messages = [{"role": role, "content": text} for role, text in chat_turns(prompt)]
        collected = collect(
            lambda n, k: self._request(messages, n or 1, sampling, max_tokens, seed_for(seed, k)),
            sampling.n,
            max_concurrency=self.max_concurrency,
        )
        if not collected.received and collected.failures:
            raise collected.failures[-1]  # nothing arrived
        return collected.received[: sampling.n]

    def candidates(
        self,
        prompts: Sequence[Instruction],
        *,
        recipe: Sequence[EndpointSampling] = ENDPOINT_RECIPE,
        max_tokens: int = 64,
        seed: int | None = 0,
    ) -> list[list[tuple[str, str]]]:
        """For each prompt, ``(text, settings)`` candidates drawn by every step of ``recipe``."""
        out = []
        for prompt in prompts:
            row: list[tuple[str, str]] = []
            for sampling in recipe:
                row += [
                    (text, sampling.settings())
                    for text in self.sample(prompt, sampling, max_tokens=max_tokens, seed=seed)
                ]
            out.append(row)
        return out
