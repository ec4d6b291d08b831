"""The one "ask for n, then top up" policy, sync and async."""

from __future__ import annotations

import asyncio

import pytest

from capplug.llms.collect import acollect, collect
from capplug.llms.retry import UpstreamHTTPError


class Endpoint:
    """Answers ``n`` natively with ``native`` items (or raises), singles from ``singles``."""

    def __init__(self, native: list[str] | BaseException, singles: list[str | BaseException]):
        self.native, self.singles, self.calls = native, list(singles), []
        self.singles_at_start = list(singles)

    def __call__(self, n: int | None) -> list[str]:
        self.calls.append(n)
        if n is not None:
            if isinstance(self.native, BaseException):
                raise self.native
            return list(self.native)
        item = self.singles.pop(0)
        if isinstance(item, BaseException):
            raise item
        return [item]

    async def acall(self, n: int | None) -> list[str]:
        return self(n)


def both(endpoint: Endpoint, n: int, **options) -> tuple[list[str], list[BaseException]]:
    """What the sync policy collects, checked to be what the async twin collects."""
    sync = collect(endpoint, n, **options)
    again = Endpoint(endpoint.native, [*endpoint.singles_at_start])
    assert asyncio.run(acollect(again.acall, n, **options)) == sync
    return sync


def test_one_native_call_when_the_endpoint_honours_n():
    endpoint = Endpoint(["a", "b", "c"], [])
    assert both(endpoint, 3) == (["a", "b", "c"], [])
    assert endpoint.calls == [3]


def test_a_shortfall_is_topped_up_with_single_calls():
    endpoint = Endpoint(["a"], ["b", "c"])
    assert both(endpoint, 3) == (["a", "b", "c"], [])
    assert endpoint.calls == [3, None, None]


def test_a_refused_n_fans_out_and_is_kept_as_a_failure():
    refused = UpstreamHTTPError(400, "unknown parameter n")
    received, failures = both(Endpoint(refused, ["a", "b"]), 2)
    assert received == ["a", "b"] and failures == [refused]


def test_a_native_call_whose_retries_ran_out_is_raised():
    down = UpstreamHTTPError(503, "overloaded")
    with pytest.raises(UpstreamHTTPError, match="503"):
        collect(Endpoint(down, ["a"]), 2)
    with pytest.raises(UpstreamHTTPError, match="503"):
        asyncio.run(acollect(Endpoint(down, ["a"]).acall, 2))


def test_failed_single_calls_are_failures_and_the_rest_still_count():
    lost = UpstreamHTTPError(500, "boom")
    received, failures = both(Endpoint([], ["a", lost]), 2, native=False)
    assert received == ["a"] and failures == [lost]
