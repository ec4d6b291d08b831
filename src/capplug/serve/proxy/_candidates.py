"""One reranked request's candidates: collected from the upstream by capplug's one policy,
then chosen among by the selection core (and recorded for feedback)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request

from capplug.llms.collect import Collected, acollect, describe_error
from capplug.llms.retry import AttemptBudget
from capplug.selection import (
    TOOL_CALLS_UNSCORED,
    choose,
    distinct,
    openai_logprobs,
    tool_call_order,
    unscored_metadata,
)
from capplug.serve._scoring_queue import ScoringQueue
from capplug.serve.proxy._metrics import TIMING_KEY
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


@dataclass
class Selection:
    order: list[int]
    """Every candidate's index, in the order to return them: the chosen one first."""
    metadata: dict[str, Any]
    """The selection core's metadata (scores, signals and weights, or ``reason`` when unscored)."""
    seconds: float = 0.0


class Candidates:
    """Collects a request's candidates from the upstream and chooses among them."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        scoring: ScoringQueue,
        combiner: Any,
        feedback: Any,
        native_n: Literal["auto", "never"],
        quirk_seconds: float,
        task_scorers: Any = None,
    ) -> None:
        self.upstream = upstream
        self.task_scorers = task_scorers
        self.metrics = upstream.metrics
        self.scoring = scoring
        self.combiner = combiner
        self.feedback = feedback
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
        self, instruction: str, choices: list[dict[str, Any]], task: str | None = None
    ) -> Selection:
        """The selection core's choice among ``choices``, and the order to return them in;
        ``task`` (a chat's system message) finds its task scorer, if there are any."""
        texts = [candidate_text(c) for c in choices]
        order = tool_call_order([has_tool_calls(c) for c in choices])
        if order is not None:
            return Selection(order, unscored_metadata(texts, order, TOOL_CALLS_UNSCORED))
        unique, where = distinct(texts)
        started = time.perf_counter()
        task_choice = None
        try:
            if self.task_scorers is not None:
                task_choice = await asyncio.to_thread(self.task_scorers.find, task or instruction)
            scorer = None if task_choice is None else task_choice.scorer
            unique_scores = await self.scoring.score(instruction, unique, scorer=scorer)
        except Exception as error:
            seconds = time.perf_counter() - started
            self.metrics.scoring_failures.inc()
            logger.error("scoring failed; answering unscored: %s", describe_error(error))
            reason = (
                f"scoring failed ({describe_error(error)}); candidates are in the order received"
            )
            order = list(range(len(choices)))
            return Selection(order, unscored_metadata(texts, order, reason), seconds)
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
        metadata = chosen.metadata()
        metadata["task_scorer"] = None if task_choice is None else task_choice.info
        return Selection(chosen.order(), metadata, seconds)

    async def choose(
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
        task: str | None = None,
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
                self.upstream.name,
                len(choices),
                describe_error(collected.failures[-1]),
            )
        selection = await self.select(instruction, choices, task)
        if reason is not None:
            selection.metadata["reason"] = reason
        order = selection.order[:want]
        if self.feedback is not None and selection.metadata["scores"] is not None:
            selection.metadata["selection_id"] = await self._record(
                instruction, selection.metadata, model, task
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
            self.upstream.name,
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

    async def _record(
        self, instruction: str, chosen: dict[str, Any], model: str, task: str | None
    ) -> str | None:
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
                task=task,
            )
        except Exception as error:
            logger.error("could not record the selection for feedback: %s", describe_error(error))
            return None


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
