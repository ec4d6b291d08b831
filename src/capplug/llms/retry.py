"""One retry policy for every call capplug makes to a remote model.

What is retried: rate limits (429), request timeouts (408), conflicts (409), server errors (5xx),
timeouts and dropped or refused connections, whether they surface as the ``openai`` SDK's error
classes, as ``httpx`` / ``httpx2`` exceptions, as the built-in ``TimeoutError`` /
``ConnectionError``, or as :class:`UpstreamHTTPError` from plain HTTP code. Everything else (bad
requests, authentication, malformed bodies) fails at once: repeating it cannot help.

How long it waits: exponential backoff with jitter, never less than the server's ``Retry-After``
(or ``retry-after-ms``) when it sends one, within a bound on attempts and a bound on the total time
spent; a wait that would cross the time bound is not started. Each sleep is logged (WARNING, logger
``capplug.llms.retry``) with the attempt, the wait and the reason.

SDK retries: wrap a client with :func:`without_sdk_retries` (the policy does this itself in
:meth:`RetryPolicy.wrap_client`), so that attempts never multiply as policy x SDK.

    policy = RetryPolicy(max_attempts=5, max_total_seconds=60)
    reply = policy.call(client.chat.completions.create, model=..., messages=...)
    reply = await policy.acall(async_client.chat.completions.create, model=..., messages=...)
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import tenacity

from capplug.errors import RETRYABLE_STATUS, AttemptsSpent, UpstreamHTTPError

__all__ = [
    "DEFAULT_RETRY",
    "AttemptBudget",
    "AttemptsSpent",
    "RetryEvent",
    "RetryPolicy",
    "UpstreamHTTPError",
    "gather_best_effort",
    "is_retryable",
    "retry_after_seconds",
    "status_of",
    "without_sdk_retries",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryEvent:
    """What the policy tells ``on_retry`` before each sleep."""

    attempt: int
    wait: float
    error: BaseException
    retry_after: float | None


def _transport_error_classes() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for module_name in ("httpx", "httpx2"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        classes.append(module.TransportError)  # timeouts, connect/read errors, protocol errors
    return tuple(classes)


def status_of(error: BaseException) -> int | None:
    """The HTTP status an error carries (ours, the openai SDK's, httpx's), else ``None``."""
    if isinstance(error, UpstreamHTTPError):
        return error.status
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_retryable(error: BaseException) -> bool:
    """True for errors that a later attempt may not meet (see the module docstring).

    Subclasses count as their bases (LangChain's ``OpenAIRateLimitError`` is an
    ``openai.RateLimitError``), and LangChain's provider-neutral ``ModelError`` classes are
    believed when they say ``is_retryable``.
    """
    if isinstance(error, UpstreamHTTPError):
        return error.retryable
    lineage = {(c.__module__.split(".")[0], c.__name__) for c in type(error).__mro__}
    if ("openai", "APIConnectionError") in lineage:  # timeouts included
        return True
    if ("openai", "APIResponseValidationError") in lineage:
        return False  # a malformed body repeats
    flag = getattr(error, "is_retryable", None)
    if isinstance(flag, bool):
        return flag
    if isinstance(error, _transport_error_classes()):
        return True
    status = status_of(error)
    modules = {module for module, _ in lineage}
    if status is not None and modules & {"openai", "httpx", "httpx2", "requests"}:
        return status in RETRYABLE_STATUS or status >= 500
    return False


def _headers_of(error: BaseException) -> Mapping[str, str] | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    return headers if headers is not None else getattr(error, "headers", None)


def retry_after_seconds(error: BaseException) -> float | None:
    """The wait the server asked for (``retry-after-ms`` or ``Retry-After``), in seconds."""
    if isinstance(error, UpstreamHTTPError) and error.retry_after is not None:
        return max(0.0, error.retry_after)
    headers = _headers_of(error)
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff, jitter and ``Retry-After``.

    Args:
        max_attempts: attempts in all, the first included (1 turns retrying off).
        max_total_seconds: no wait is started that would end past this many seconds after the
            first attempt began.
        initial_backoff: the first wait, doubled on each retry up to ``max_backoff``.
        jitter: up to this many seconds added at random to each backoff, so that many clients
            do not retry in step.
        max_retry_after: a ``Retry-After`` above this is treated as "give up" rather than obeyed.
        on_retry: called with a :class:`RetryEvent` before each sleep (for metrics).
        sleep, async_sleep: the sleeping functions (tests pass fakes).
    """

    max_attempts: int = 5
    max_total_seconds: float = 60.0
    initial_backoff: float = 0.5
    max_backoff: float = 20.0
    jitter: float = 0.5
    max_retry_after: float = 60.0
    on_retry: Callable[[RetryEvent], None] | None = field(default=None, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    async_sleep: Callable[[float], Awaitable[None]] = field(
        default=asyncio.sleep, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an integer; got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1; got {self.max_attempts}")
        for name in ("max_total_seconds", "initial_backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")
        if not isinstance(self.jitter, int | float) or self.jitter < 0:
            raise ValueError(f"jitter must be a number >= 0; got {self.jitter!r}")

    def with_options(self, **changes: Any) -> RetryPolicy:
        """A copy with some settings changed."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ tenacity pieces

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_exponential_jitter(
            multiplier=self.initial_backoff, max=self.max_backoff, jitter=self.jitter
        )(state)
        error = state.outcome.exception() if state.outcome else None
        asked = retry_after_seconds(error) if error is not None else None
        if asked is not None and asked > self.max_retry_after:
            return float("inf")  # the stop rule turns this into giving up
        return max(backoff, asked or 0.0)

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        since = state.seconds_since_start or 0.0
        return since + state.upcoming_sleep > self.max_total_seconds

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.upcoming_sleep
        logger.warning(
            "attempt %d of %d failed (%s: %s); retrying in %.2fs",
            state.attempt_number,
            self.max_attempts,
            type(error).__name__,
            _short(error),
            wait,
        )
        if self.on_retry is not None and error is not None:
            self.on_retry(RetryEvent(state.attempt_number, wait, error, retry_after_seconds(error)))

    def _kwargs(self) -> dict[str, Any]:
        return {
            "stop": self._stop,
            "wait": self._wait,
            "retry": tenacity.retry_if_exception(is_retryable),
            "before_sleep": self._before_sleep,
            "reraise": True,
        }

    def retrying(self) -> tenacity.Retrying:
        """A tenacity ``Retrying`` following this policy (``for attempt in ...: with attempt:``)."""
        return tenacity.Retrying(sleep=self.sleep, **self._kwargs())

    def async_retrying(self) -> tenacity.AsyncRetrying:
        """The async counterpart of :meth:`retrying`."""
        return tenacity.AsyncRetrying(sleep=self.async_sleep, **self._kwargs())

    # ------------------------------------------------------------------ calling

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried; the last error is raised when retries run out."""
        return self.retrying()(fn, *args, **kwargs)

    async def acall(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)``, retried (``fn`` may be any callable returning an awaitable)."""

        async def attempt() -> T:
            return await fn(*args, **kwargs)

        return await self.async_retrying()(attempt)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A decorator form of :meth:`call` / :meth:`acall` (chosen by whether ``fn`` is async)."""
        if asyncio.iscoroutinefunction(fn):
            return self.async_retrying().wraps(fn)
        return self.retrying().wraps(fn)

    def wrap_client(self, client: Any) -> Any:
        """The client with its SDK's own retries off, so only this policy retries."""
        return without_sdk_retries(client)


DEFAULT_RETRY = RetryPolicy()
"""The policy capplug uses when none is given: 5 attempts within 60 seconds."""


class AttemptBudget:
    """The upstream attempts one request may spend, shared by all the calls it fans out to.

    Each call retried on its own would multiply attempts (``n`` calls x ``max_attempts``); with
    a shared budget, an attempt starts only while the attempts that failed plus those still in
    flight number fewer than ``limit``. A lasting failure therefore costs exactly ``limit``
    attempts however many calls the request makes, while attempts that succeed free their place:
    a healthy request makes all its calls, at most ``limit`` at a time. When the budget is spent,
    :meth:`attempt` raises :class:`AttemptsSpent` (never retried).

        budget = AttemptBudget(policy.max_attempts)
        async def attempt():
            async with budget.attempt():
                return await client.post(...)
        await asyncio.gather(*(policy.acall(attempt) for _ in range(n)))
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"an attempt budget must be an integer >= 1; got {limit!r}")
        self.limit = limit
        self.failed = 0
        self.in_flight = 0
        self.started = 0
        self.last: BaseException | None = None
        self._changed = asyncio.Event()

    @property
    def spent(self) -> bool:
        return self.failed >= self.limit

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the event that was just set

    async def _acquire(self) -> None:
        while self.failed + self.in_flight >= self.limit:
            if self.spent:
                raise AttemptsSpent(self.failed, self.limit, self.last)
            await self._changed.wait()
        self.in_flight += 1
        self.started += 1

    def attempt(self) -> _BudgetedAttempt:
        """``async with budget.attempt():`` around one attempt; failing inside it spends one."""
        return _BudgetedAttempt(self)


class _BudgetedAttempt:
    def __init__(self, budget: AttemptBudget) -> None:
        self.budget = budget

    async def __aenter__(self) -> None:
        await self.budget._acquire()

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        budget = self.budget
        budget.in_flight -= 1
        if error is not None and not isinstance(error, asyncio.CancelledError):
            budget.failed += 1
            budget.last = error
        budget._notify()


def without_sdk_retries(client: Any) -> Any:
    """A copy of an SDK client (``openai.OpenAI``/``AsyncOpenAI`` and look-alikes) with retries off.

    Clients without a retry setting are returned unchanged.
    """
    if getattr(client, "max_retries", None) in (None, 0):
        return client
    with_options = getattr(client, "with_options", None)
    if callable(with_options):
        return with_options(max_retries=0)
    return client


async def gather_best_effort(
    calls: Iterable[Awaitable[T]],
    *,
    min_successes: int = 1,
    max_concurrency: int | None = None,
) -> tuple[list[T], list[BaseException]]:
    """Run ``calls`` concurrently (at most ``max_concurrency`` at once); ``(results, failures)``.

    Results keep the order of the calls that succeeded. When fewer than ``min_successes``
    succeeded the last failure is raised (cancellation is never swallowed).
    """
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def bounded(call: Awaitable[T]) -> T:
        if limit is None:
            return await call
        async with limit:
            return await call

    outcomes = await asyncio.gather(*(bounded(c) for c in calls), return_exceptions=True)
    results: list[T] = []
    failures: list[BaseException] = []
    for outcome in outcomes:
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
        if isinstance(outcome, BaseException):
            failures.append(outcome)
        else:
            results.append(outcome)
    if len(results) < min_successes:
        if failures:
            raise failures[-1]
        raise ValueError(f"needed at least {min_successes} results; got {len(results)}")
    return results, failures


def _short(error: BaseException | None, limit: int = 200) -> str:
    text = str(error) if error is not None else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
