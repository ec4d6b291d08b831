"""One reranked request's candidates: collected from the upstream by capplug's one policy,
then chosen among by the selection path (:class:`capplug.selection.Selector`, which records the
choice for feedback), scored through the proxy's scoring queue."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from capplug.chat import Prompt
from capplug.llms.collect import Collected, acollect, describe_error
from capplug.llms.retry import AttemptBudget
from capplug.selection import (
    TOOL_CALLS_UNSCORED,
    Selection,
    Selector,
    reply_logprobs,
    tool_call_order,
)
from capplug.serve._scoring_queue import ScoringQueue
from capplug.serve.proxy._replies import (
    Replies,
    candidate_text,
    has_tool_calls,
    single_request,
)
from capplug.serve.proxy._responses import response_object
from capplug.serve.proxy._upstream import Upstream, UpstreamFailure

logger = logging.getLogger("capplug.serve.proxy")


_MAX_REMEMBERED_MODELS = 1024
# Single-choice answers to ``n`` within the quirk window before a model is fanned out: one short
# reply (a transient, a filtered choice) must not multiply calls and prompt tokens by n.
FAN_OUT_SIGHTINGS = 3


class Quirks:
    """What the upstream was seen not to support, per model, believed for ``seconds`` only.

    A quirk is believed after ``sightings`` sightings within ``seconds`` (one transient short
    reply changes nothing), or at once when :meth:`remember` is told the evidence is conclusive
    (the upstream refused the request). While believed, one request every ``probe_seconds`` is
    let through to try again (``model in quirks`` is false for it), and :meth:`forget` drops the
    quirk when that try succeeds. Believing and forgetting are logged at WARNING and INFO.
    """

    def __init__(
        self,
        upstream: str,
        consequence: str,
        *,
        seconds: float,
        sightings: int = 1,
        probe_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.consequence = consequence
        self.seconds = seconds
        self.sightings = sightings
        self.probe_seconds = probe_seconds
        self.clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()
        self._probe_at: dict[str, float] = {}
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """Models the quirk is believed of now."""
        now = self.clock()
        return sum(until > now for until in self._until.values())

    def __contains__(self, model: object) -> bool:
        until = self._until.get(model)  # type: ignore[call-overload]
        if until is None:
            return False
        now = self.clock()
        if now >= until:
            self._drop(model)  # type: ignore[arg-type]
            return False
        if self.probe_seconds is not None and now >= self._probe_at.get(model, until):  # type: ignore[call-overload]
            self._probe_at[model] = now + self.probe_seconds  # type: ignore[index]
            return False  # this request tries again
        return True

    def remember(self, model: str, why: str, *, conclusive: bool = False) -> None:
        """One sighting of the quirk (``conclusive``: enough on its own)."""
        now = self.clock()
        if self._until.get(model, 0.0) > now:
            self._until[model] = now + self.seconds  # seen again while probing: believed on
            return
        seen = [t for t in self._seen.pop(model, []) if t > now - self.seconds] + [now]
        if not conclusive and len(seen) < self.sightings:
            self._seen[model] = seen
            while len(self._seen) > _MAX_REMEMBERED_MODELS:
                self._seen.popitem(last=False)
            return
        logger.warning(
            "the upstream %s %s for model %r; %s for the next %d s",
            self.upstream,
            why,
            model,
            self.consequence,
            round(self.seconds),
        )
        self._until[model] = now + self.seconds
        if self.probe_seconds is not None:
            self._probe_at[model] = now + self.probe_seconds
        while len(self._until) > _MAX_REMEMBERED_MODELS:
            self._drop(next(iter(self._until)))

    def forget(self, model: str) -> None:
        """The upstream did support it after all: believe it again (and forget the sightings)."""
        self._seen.pop(model, None)
        if model in self._until:
            self._drop(model)
            logger.info("the upstream %s supports it again for model %r", self.upstream, model)

    def _drop(self, model: str) -> None:
        self._until.pop(model, None)
        self._probe_at.pop(model, None)


@dataclass(frozen=True)
class Reranked:
    """One request's choice as the routes answer it."""

    order: list[int]
    """The indices of the choices to return (``want`` of them), the chosen one first."""
    metadata: dict[str, Any]
    """The ``capplug`` object: collecting's and the selection's metadata, and the proxy's own
    (``returned``, ``upstream_seconds``, ``scoring_seconds``)."""
    headers: dict[str, str]
    """The answer's headers: the upstream's rate limits and the candidate counts."""
    timings: tuple[tuple[str, float], ...]
    """``(name, seconds)`` for the ``Server-Timing`` header."""


class Candidates:
    """Collects a request's candidates from the upstream and chooses among them."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        scoring: ScoringQueue,
        selector: Selector,
        native_n: Literal["auto", "never"],
        quirk_seconds: float,
    ) -> None:
        self.upstream = upstream
        self.metrics = upstream.metrics
        self.scoring = scoring
        self.selector = selector
        self.native_n = native_n
        self._ignores_n = Quirks(
            upstream.name,
            "asking for one candidate per request",
            seconds=quirk_seconds,
            sightings=FAN_OUT_SIGHTINGS,
            probe_seconds=quirk_seconds / 10,
        )
        self.metrics.fanned_out_models.set_function(lambda: len(self._ignores_n))

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
            reply, reply_headers = await self.upstream.call(body, headers, budget)
            replies.add(reply, reply_headers)
            return reply["choices"][: count or 1]

        native = self.native_n == "auto" and model not in self._ignores_n
        collected = await acollect(call, n, native=native, max_concurrency=None)
        if collected.refused is not None:
            self._ignores_n.remember(
                model, f"refused n={n} ({describe_error(collected.refused)})", conclusive=True
            )
        elif collected.native and collected.native_count < 2:
            self._ignores_n.remember(
                model, f"answered n={n} with one choice {FAN_OUT_SIGHTINGS} times"
            )
        elif collected.native:
            self._ignores_n.forget(model)
        return _received_or_raise(collected), replies

    async def collect_responses(
        self, payload: dict[str, Any], headers: list[tuple[str, str]], n: int, budget: AttemptBudget
    ) -> tuple[Collected[dict[str, Any]], Replies]:
        """``n`` Responses-API candidates: single requests (the API has no ``n``)."""
        replies = Replies()

        async def call(_count: int | None, _k: int) -> list[dict[str, Any]]:
            reply, reply_headers = await self.upstream.call(
                payload, headers, budget, url=self.upstream.responses_url, parse=response_object
            )
            replies.add(reply, reply_headers)
            return [reply]

        collected = await acollect(call, n, native=False, max_concurrency=None)
        return _received_or_raise(collected), replies

    async def select(
        self, prompt: Prompt, choices: list[dict[str, Any]], model: str
    ) -> tuple[Selection, float]:
        """The selection path's choice among ``choices`` (scored through the scoring queue,
        recorded for feedback) and the seconds it took; unscored, with the reason, when a
        candidate calls tools or scoring fails (non-finite scores included)."""
        texts = [candidate_text(c) for c in choices]
        order = tool_call_order([has_tool_calls(c) for c in choices])
        if order is not None:
            return Selection.unscored(texts, order, TOOL_CALLS_UNSCORED), 0.0
        logprobs, counts = reply_logprobs([c.get("logprobs") for c in choices])
        started = time.perf_counter()
        try:
            selection = await self.selector.aselect(
                prompt,
                texts,
                logprobs=logprobs,
                token_counts=counts,
                model=model,
                score=self._score,
            )
        except Exception as error:
            self.metrics.scoring_failures.inc()
            logger.error("scoring failed; answering unscored: %s", describe_error(error))
            reason = (
                f"scoring failed ({describe_error(error)}); candidates are in the order received"
            )
            seconds = time.perf_counter() - started
            return Selection.unscored(texts, range(len(texts)), reason), seconds
        seconds = time.perf_counter() - started
        self.metrics.scoring_seconds.observe(seconds)
        return selection, seconds

    async def _score(self, text: str, texts: list[str], scorer: Any) -> list[float]:
        """The scoring queue's scores (batched with other requests that use the same scorer)."""
        own = scorer is self.scoring.scorer
        return await self.scoring.score(text, texts, scorer=None if own else scorer)

    async def choose(
        self,
        prompt: Prompt,
        collected: Collected[dict[str, Any]],
        replies: Replies,
        choices: list[dict[str, Any]],
        *,
        n: int,
        want: int,
        model: str,
        started: float,
        reason: str | None = None,
    ) -> Reranked:
        """Choose among one request's candidates: the order to return them in (``want`` of
        them), the ``capplug`` metadata, the headers that say the same, and the timings for
        ``Server-Timing``. Counts and times the request."""
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
                self.upstream.name,
                len(choices),
                describe_error(collected.failures[-1]),
            )
        selection, scoring_seconds = await self.select(prompt, choices, model)
        if reason is not None:
            selection = replace(selection, reason=reason)
        order = selection.order()[:want]
        meta = {
            **collected.metadata(n),
            **selection.metadata(),
            "returned": order,
            "upstream_seconds": round(upstream_seconds, 6),
            "scoring_seconds": round(scoring_seconds, 6),
        }
        logger.debug(
            "reranked %d candidates from %s: returned %s (upstream %.3f s, scoring %.3f s)",
            len(choices),
            self.upstream.name,
            order,
            upstream_seconds,
            scoring_seconds,
        )
        headers = {
            **replies.headers,
            "X-Capplug-Candidates": str(len(choices)),
            "X-Capplug-Failures": str(len(collected.failures)),
        }
        timings = (("upstream", upstream_seconds), ("scoring", scoring_seconds))
        return Reranked(order, meta, headers, timings)


def _received_or_raise(collected: Collected[Any]) -> Collected[Any]:
    """``collected`` with its failures unwrapped; the last failure raised when none arrived."""
    if not collected.received:
        last = collected.failures[-1]
        failure = last if isinstance(last, UpstreamFailure) else UpstreamFailure(last, 0)
        failure.calls = len(collected.failures)
        raise failure
    collected.failures = [
        f.error if isinstance(f, UpstreamFailure) else f for f in collected.failures
    ]
    return collected
