"""The scorer's one worker thread: small requests batched, big ones sliced, smallest first.

Used by the reranking proxy. Scoring never runs on the event loop: torch already spreads one
forward pass over every CPU core, so two at once would only thrash them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScoringQueue"]

# A request waiting for the scorer gains this many tokens of priority per second waited.
_AGEING_TOKENS_PER_SECOND = 2048


@dataclass
class _ScoringJob:
    instruction: str
    responses: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[float]]
    costs: list[int] = field(default_factory=list)  # estimated tokens of each pair
    arrived: float = field(default_factory=time.monotonic)
    busy: bool = False  # a call of its own is being scored (in one lane or the other)
    scores: list[float] = field(default_factory=list)  # of responses[: len(scores)]
    scorer: Any = None  # a task scorer for this request; None: the queue's own

    @property
    def remaining(self) -> int:
        return sum(self.costs[len(self.scores) :])


class ScoringQueue:
    """Scores candidates on one worker thread, batching small requests and slicing big ones.

    Work is estimated in tokens per (instruction, response) pair, and served in two lanes, each
    a worker thread of its own. Small requests (at most one slice of work left) are batched
    together into one call, smallest first (a request that has waited gains
    ``_AGEING_TOKENS_PER_SECOND`` of priority per second). A request with a long conversation
    is scored in the other lane a slice at a time, so a small request never waits for it (with
    one lane, one 512-token pair on a loaded 2-core machine held small requests up by 0.2 to
    0.45 s), and no new slice starts while small requests are being scored. A slice is about ``slice_seconds`` of scoring, by the throughput the queue measures
    on the slices themselves (at least ``slice_tokens``; long pairs cost more per token than
    short ones): a fast scorer takes bigger slices, since each call has a fixed cost and 100
    documents cut into 6-document calls took 3x the scorer's own time. Only scorers with
    ``score_pairs`` (which score each pair on its own) are sliced; others get each request's
    responses in one call, in the small lane.

    The threads live as long as the process (daemons, idle when there is nothing to score):
    measured here, a thread that keeps torch's thread pool warm scores 8 candidates in about
    two thirds of the time a fresh thread takes.

    ``threads`` > 1 splits each call's pairs over that many threads, each scoring its part with
    one torch thread (the caller sets torch to one thread: a process-wide setting, which
    ``capplug serve proxy`` makes since scoring is all it computes). Torch's own two-thread
    pool, driven from a thread that is not the main one, spent about 15 ms more on each call
    than from the main thread; one thread per part does not.
    """

    def __init__(
        self,
        scorer: Any,
        *,
        slice_tokens: int = 512,
        slice_seconds: float = 0.1,
        batch_tokens: int = 16384,
        threads: int = 1,
    ) -> None:
        self.scorer = scorer
        self.slice_tokens = slice_tokens
        self.slice_seconds = slice_seconds
        self.batch_tokens = batch_tokens
        self._tokens_per_second = 0.0  # measured on slices; 0 until the first one
        score_pairs = getattr(scorer, "score_pairs", None)
        self._pairwise = score_pairs if callable(score_pairs) else None
        self._parts = (
            ThreadPoolExecutor(threads, thread_name_prefix="capplug-scoring-part")
            if threads > 1 and self._pairwise is not None
            else None
        )
        self._threads = threads
        self._max_length = int(getattr(scorer, "max_length", 512) or 512)
        self._pending: list[_ScoringJob] = []
        self._wake = threading.Condition()
        self._workers: dict[str, threading.Thread] = {}
        self._small_calls = 0  # small-lane calls being scored (0 or 1)

    def _cost(self, instruction: str, response: str) -> int:
        # About four characters per token; the scorer cuts every pair to max_length.
        return min(self._max_length, (len(instruction) + len(response)) // 4 + 3)

    async def score(
        self, instruction: str, responses: list[str], *, scorer: Any = None
    ) -> list[float]:
        """Scores of ``responses`` to ``instruction``, in order; awaits the worker thread.

        ``scorer``: score this request with another scorer of the same kind (a task scorer);
        requests are batched only with others that use the same scorer."""
        loop = asyncio.get_running_loop()
        job = _ScoringJob(instruction, responses, loop, loop.create_future(), scorer=scorer)
        job.costs = [self._cost(instruction, r) for r in responses]
        with self._wake:
            self._pending.append(job)
            for lane in ("small", "big"):
                worker = self._workers.get(lane)
                if worker is None or not worker.is_alive():
                    worker = threading.Thread(
                        target=self._work, args=(lane,), name=f"capplug-scoring-{lane}", daemon=True
                    )
                    self._workers[lane] = worker
                    worker.start()
            self._wake.notify_all()
        return await job.future

    def _next_call(self, lane: str) -> list[tuple[_ScoringJob, int]]:
        """(job, how many of its next responses) for one call of ``lane``; under the lock.

        The small lane batches small requests together, up to ``batch_tokens``; the big lane
        takes one slice of at most ``slice_tokens`` of the big request first in line. A request
        in a call of either lane is skipped by the other until that call ends.
        """
        now = time.monotonic()
        self._pending = [j for j in self._pending if not j.future.done()]  # clients gone
        slice_tokens = max(self.slice_tokens, int(self._tokens_per_second * self.slice_seconds))
        free = sorted(
            (j for j in self._pending if not j.busy),
            key=lambda j: j.remaining - _AGEING_TOKENS_PER_SECOND * (now - j.arrived),
        )

        def is_big(job: _ScoringJob) -> bool:  # sliced, in the big lane
            return self._pairwise is not None and job.remaining > slice_tokens

        if lane == "big":
            if self._small_calls:
                return []  # no new slice while small requests are scored: they have the cores
            big = [j for j in free if is_big(j)]
            if not big:
                return []
            job = big[0]
            start, take, cost = len(job.scores), 0, 0
            for pair_cost in job.costs[start:]:
                if take and cost + pair_cost > slice_tokens:
                    break
                take += 1
                cost += pair_cost
            job.busy = True
            return [(job, take)]
        call: list[tuple[_ScoringJob, int]] = []
        tokens = 0
        for job in free:
            if is_big(job):
                continue  # the big lane's
            if call and job.scorer is not call[0][0].scorer:
                continue  # one call, one scorer
            if call and tokens + job.remaining > self.batch_tokens:
                break
            call.append((job, len(job.responses) - len(job.scores)))
            tokens += job.remaining
        for job, _ in call:
            job.busy = True
        self._small_calls += bool(call)
        return call

    def _work(self, lane: str) -> None:
        while True:
            with self._wake:
                call: list[tuple[_ScoringJob, int]] = []
                while not call:
                    call = self._next_call(lane)
                    if not call:
                        self._wake.wait()
            try:
                self._run(call, measure=lane == "big")
            except BaseException as error:  # never leave a request waiting forever
                for job, _ in call:
                    self._finish(job, error=error)
            with self._wake:
                self._small_calls -= lane == "small"
                for job, _ in call:
                    job.busy = False
                    if job.future.done() or len(job.scores) == len(job.responses):
                        with contextlib.suppress(ValueError):
                            self._pending.remove(job)
                self._wake.notify_all()  # what was in this call may now suit the other lane

    def _finish(self, job: _ScoringJob, *, error: BaseException | None = None) -> None:
        if error is not None:
            job.scores = [math.nan] * len(job.responses)  # done: take it off the queue
            _settle(job, error=error)
        elif len(job.scores) == len(job.responses):
            _settle(job, scores=job.scores)

    def _run(self, call: list[tuple[_ScoringJob, int]], *, measure: bool = False) -> None:
        started = time.perf_counter()
        try:
            results = self._score(call)
            if measure:
                self._measured(call, time.perf_counter() - started)
        except Exception as error:
            if len(call) == 1:
                self._finish(call[0][0], error=error)
                return
            # One request's input must not fail the others that shared its call.
            for part in call:
                self._run([part])
            return
        for (job, _), scores in zip(call, results, strict=True):
            job.scores.extend(scores)
            self._finish(job)

    def _score_pairs(self, pairwise: Any, pairs: list[tuple[str, str]]) -> list[float]:
        """``pairwise(pairs)``, split over the part threads when there are some."""
        if self._parts is None or len(pairs) < 2:
            return list(pairwise(pairs))
        futures = [
            self._parts.submit(pairwise, pairs[start:end])
            for start, end in _split(len(pairs), self._threads)
        ]
        return [float(s) for future in futures for s in future.result()]

    def _measured(self, call: list[tuple[_ScoringJob, int]], seconds: float) -> None:
        """Fold one call's tokens per second into the running estimate slices are sized by."""
        tokens = sum(sum(job.costs[len(job.scores) : len(job.scores) + take]) for job, take in call)
        if seconds <= 0 or tokens <= 0:
            return
        rate = tokens / seconds
        old = self._tokens_per_second
        self._tokens_per_second = rate if old == 0 else 0.7 * old + 0.3 * rate

    def _score(self, call: list[tuple[_ScoringJob, int]]) -> list[list[float]]:
        parts = [
            (job, job.responses[len(job.scores) : len(job.scores) + take]) for job, take in call
        ]
        scorer = call[0][0].scorer or self.scorer
        pairwise = self._pairwise if scorer is self.scorer else getattr(scorer, "score_pairs", None)
        if self._pairwise is None or pairwise is None:
            results = [list(scorer.score(job.instruction, texts)) for job, texts in parts]
        else:
            pairs = [(job.instruction, text) for job, texts in parts for text in texts]
            flat = self._score_pairs(pairwise, pairs)
            results, start = [], 0
            for _, texts in parts:
                results.append(flat[start : start + len(texts)])
                start += len(texts)
        for (_, texts), scores in zip(parts, results, strict=True):
            if len(scores) != len(texts):
                raise ValueError(
                    f"the scorer returned {len(scores)} scores for {len(texts)} responses"
                )
        return [[float(s) for s in scores] for scores in results]


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, end)`` ranges over ``count`` items, sizes differing by <= 1."""
    size, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            ranges.append((start, end))
        start = end
    return ranges


def _settle(
    job: _ScoringJob, *, scores: list[float] | None = None, error: BaseException | None = None
) -> None:
    def settle() -> None:
        if job.future.done():  # the request was cancelled (its client went away)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(scores or [])

    # A closed event loop raises RuntimeError: its request is gone and nobody is waiting.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(settle)
