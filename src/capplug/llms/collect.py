"""Asking a chat model for n candidates: n in one call where it can, single calls for the rest.

The policy, written once for every client that samples candidates (the LangChain best-of-n
components, :class:`~capplug.llms.remote.OpenAICompatibleModel`):

1. with ``native``, one call asks for all ``n``; a call whose retries ran out is raised (more
   calls would meet the same), a refusal (say, of ``n`` itself) is kept as a failure;
2. whatever is still missing (the native call refused, ignored ``n`` or returned fewer) comes
   from single calls, at most ``max_concurrency`` at a time; failed ones are kept as failures.

What too few candidates mean (an error, or the best of fewer) is the caller's to decide.

Each ``call(n)`` returns a list of candidates (any type): ``call(n)`` asks for ``n`` at once,
``call(None)`` for one, with no ``n`` in the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from capplug.llms.retry import gather_best_effort, is_retryable

__all__ = ["acollect", "collect"]

T = TypeVar("T")


def collect(
    call: Callable[[int | None], list[T]],
    n: int,
    *,
    native: bool = True,
    max_concurrency: int = 8,
) -> tuple[list[T], list[BaseException]]:
    """``n`` candidates by the policy above: ``(received, failures)``, received in call order."""
    received, failures = _native(call, n) if native and n > 1 else ([], [])
    missing = n - len(received)
    if missing > 0:
        with ThreadPoolExecutor(min(missing, max_concurrency)) as pool:
            futures = [pool.submit(call, None) for _ in range(missing)]
            for future in futures:
                try:
                    received += future.result()
                except Exception as error:
                    failures.append(error)
    return received, failures


async def acollect(
    call: Callable[[int | None], Awaitable[list[T]]],
    n: int,
    *,
    native: bool = True,
    max_concurrency: int = 8,
) -> tuple[list[T], list[BaseException]]:
    """The async counterpart of :func:`collect`."""
    received: list[T] = []
    failures: list[BaseException] = []
    if native and n > 1:
        try:
            received += await call(n)
        except Exception as error:
            if is_retryable(error):
                raise
            failures.append(error)
    missing = n - len(received)
    if missing > 0:
        results, lost = await gather_best_effort(
            (call(None) for _ in range(missing)), min_successes=0, max_concurrency=max_concurrency
        )
        for result in results:
            received += result
        failures += lost
    return received, failures


def _native(call: Callable[[int | None], list[T]], n: int) -> tuple[list[T], list[BaseException]]:
    try:
        return list(call(n)), []
    except Exception as error:
        if is_retryable(error):
            raise
        return [], [error]  # refused outright (e.g. no `n`): fan out instead
