"""Asking a chat model for n candidates: n in one call where it can, single calls for the rest.

The policy, written once for every client that samples candidates (the proxy, the LangChain
best-of-n components, :class:`~capplug.llms.remote.OpenAICompatibleModel`):

1. with ``native`` and ``n > 1``, one call asks for all ``n``. A call whose retries ran out (a
   retryable error) is raised: more calls would meet the same. A 400 or 422 that names ``n``
   (its ``param``, or the word in its message), or an error with no HTTP status, may be a
   refusal of ``n`` itself: one plain call tells. Any other refusal (a 400 about something
   else, 401, 404, ...: the request itself is refused), or a plain call that fails too, stops
   collecting with that error as the only failure, so a bad request costs one upstream call;
   otherwise the refusal is kept in :attr:`Collected.refused`, not counted as a failure;
2. whatever is still missing (the ``n`` call refused, ignored ``n`` or returned fewer) comes from
   single calls, at most ``max_concurrency`` at a time; failed ones are kept as failures.

What too few candidates mean (an error, or the best of fewer) is the caller's to decide.

``call(n, k)`` returns a list of candidates (any type). ``call(n, 0)`` asks for ``n`` at once;
``call(None, k)`` asks for one, with no ``n`` in the request, as the candidate at index ``k``.
A caller with a fixed seed should offset it by ``k``, so single calls draw different candidates
and the same request still draws the same ones (:func:`seed_for`).

:meth:`Collected.metadata` is the ``capplug`` metadata every surface reports about collecting;
the selection core's :meth:`~capplug.selection.core.Selection.metadata` is the rest.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from capplug.llms.retry import UpstreamHTTPError, gather_best_effort, is_retryable, status_of

__all__ = [
    "Collected",
    "acollect",
    "collect",
    "describe_error",
    "names_parameter",
    "seed_for",
]

T = TypeVar("T")


@dataclass
class Collected(Generic[T]):
    """What collecting ``n`` candidates gave."""

    received: list[T] = field(default_factory=list)
    """The candidates, in the order their calls were made."""
    failures: list[BaseException] = field(default_factory=list)
    """Candidate calls that failed (a refused ``n`` call is not one of them: see ``refused``)."""
    calls: int = 0
    """Calls made (retries of one call not counted)."""
    native: bool = False
    """The call asking for all ``n`` at once was answered."""
    native_count: int = 0
    """How many candidates that call returned (fewer than ``n``: the endpoint ignores ``n``)."""
    refused: BaseException | None = None
    """The ``n`` call's error when it was refused and a plain call then succeeded."""

    @property
    def errors(self) -> list[BaseException]:
        """Every error met: the refusal of ``n`` (if any), then the failures."""
        return ([self.refused] if self.refused is not None else []) + self.failures

    def metadata(self, n_requested: int) -> dict[str, Any]:
        """The collecting half of the ``capplug`` metadata (one schema on every surface)."""
        return {
            "n_requested": n_requested,
            "n_received": len(self.received),
            "failures": len(self.failures),
            "errors": [describe_error(e) for e in self.failures],
            "upstream_calls": self.calls,
            "native_n": self.native,
        }


def collect(
    call: Callable[[int | None, int], list[T]],
    n: int,
    *,
    native: bool = True,
    max_concurrency: int = 8,
) -> Collected[T]:
    """``n`` candidates by the policy above."""
    out: Collected[T] = Collected()
    if native and n > 1:
        out.calls += 1
        try:
            _add_native(out, call(n, 0))
        except Exception as error:
            if not _plain_call_next(out, error):
                return out
            try:
                out.received += call(None, 0)
            except Exception as plain_error:
                out.failures.append(plain_error)
                return out
            out.refused = error
    first, missing = len(out.received), n - len(out.received)
    if missing > 0:
        out.calls += missing
        with ThreadPoolExecutor(min(missing, max_concurrency)) as pool:
            # Each call runs in a copy of the caller's context (as an asyncio task would), so
            # context-bound state such as tracing callbacks follows it into the pool.
            futures = [
                pool.submit(contextvars.copy_context().run, call, None, first + k)
                for k in range(missing)
            ]
            for future in futures:
                try:
                    out.received += future.result()
                except Exception as error:
                    out.failures.append(error)
    return out


async def acollect(
    call: Callable[[int | None, int], Awaitable[list[T]]],
    n: int,
    *,
    native: bool = True,
    max_concurrency: int | None = 8,
) -> Collected[T]:
    """The async counterpart of :func:`collect` (``max_concurrency=None``: no limit)."""
    out: Collected[T] = Collected()
    if native and n > 1:
        out.calls += 1
        try:
            _add_native(out, await call(n, 0))
        except Exception as error:
            if not _plain_call_next(out, error):
                return out
            try:
                out.received += await call(None, 0)
            except Exception as plain_error:
                out.failures.append(plain_error)
                return out
            out.refused = error
    first, missing = len(out.received), n - len(out.received)
    if missing > 0:
        out.calls += missing
        results, lost = await gather_best_effort(
            (call(None, first + k) for k in range(missing)),
            min_successes=0,
            max_concurrency=max_concurrency,
        )
        for result in results:
            out.received += result
        out.failures += lost
    return out


def _add_native(out: Collected[T], candidates: list[T]) -> None:
    out.native = True
    out.native_count = len(candidates)
    out.received += list(candidates)


def _plain_call_next(out: Collected[T], error: Exception) -> bool:
    """After the ``n`` call failed with ``error``: raise it (its retries ran out), stop with it
    as the one failure (the request itself was refused: False), or go on to the plain call that
    tells whether ``n`` alone was refused (True)."""
    if is_retryable(error):
        raise error
    status = status_of(error)
    if status is not None and not (status in (400, 422) and _names_n(error)):
        out.failures.append(error)
        return False
    out.calls += 1
    return True


_N_WORD = re.compile(r"(?<![\w-])n(?![\w-])")


def _names_n(error: BaseException) -> bool:
    """Whether a refusal is about ``n``: OpenAI's ``param`` says so, or ``n`` stands as a word
    in its message ("n must be 1", "unknown parameter 'n'")."""
    body = getattr(error, "body", None)
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict) and detail.get("param") is not None:
        return detail.get("param") == "n"
    return bool(_N_WORD.search(str(error)))


def seed_for(seed: Any, k: int) -> Any:
    """The seed of the ``k``-th candidate call: ``seed + k`` for an integer seed, else as given."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed + k
    return seed


def describe_error(error: BaseException, limit: int = 300) -> str:
    """One line for an error in metadata and logs: an upstream's status and message as it gave
    them, anything else with its type; at most ``limit`` characters."""
    if isinstance(error, UpstreamHTTPError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    text = text.rstrip(": ") or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def names_parameter(error: BaseException, parameter: str) -> bool:
    """Whether ``error`` is a 400 or 422 whose message or body names ``parameter``: the endpoint
    refused that parameter (say ``logprobs``), not the request."""
    if status_of(error) not in (400, 422):
        return False
    body = getattr(error, "body", None)
    text = f"{error} {json.dumps(body, default=str) if body is not None else ''}"
    return parameter.lower() in text.lower()
