"""The one "ask for n, then top up" policy, sync and async."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from capplug.llms.collect import (
    Collected,
    acollect,
    collect,
    describe_error,
    names_parameter,
    seed_for,
)
from capplug.llms.retry import UpstreamHTTPError


class Endpoint:
    """Answers ``n`` natively with ``native`` items (or raises), singles from ``singles``."""

    def __init__(self, native: list[str] | BaseException, singles: list[str | BaseException]):
        self.native, self.singles, self.calls = native, list(singles), []
        self.singles_at_start = list(singles)

    def __call__(self, n: int | None, k: int) -> list[str]:
        self.calls.append((n, k))
        if n is not None:
            if isinstance(self.native, BaseException):
                raise self.native
            return list(self.native)
        item = self.singles.pop(0)
        if isinstance(item, BaseException):
            raise item
        return [item]

    async def acall(self, n: int | None, k: int) -> list[str]:
        return self(n, k)


def both(endpoint: Endpoint, n: int, **options) -> Collected[str]:
    """What the sync policy collects, checked to be what the async twin collects."""
    sync = collect(endpoint, n, **options)
    again = Endpoint(endpoint.native, [*endpoint.singles_at_start])
    assert asyncio.run(acollect(again.acall, n, **options)) == sync
    assert again.calls == endpoint.calls
    return sync


def test_one_native_call_when_the_endpoint_honours_n():
    endpoint = Endpoint(["a", "b", "c"], [])
    got = both(endpoint, 3)
    assert got.received == ["a", "b", "c"] and got.failures == []
    assert got.native and got.native_count == 3 and got.calls == 1
    assert endpoint.calls == [(3, 0)]


def test_a_shortfall_is_topped_up_with_single_calls_at_the_next_indices():
    endpoint = Endpoint(["a"], ["b", "c"])
    got = both(endpoint, 3)
    assert got.received == ["a", "b", "c"] and got.failures == []
    assert got.native_count == 1  # the caller may remember that this endpoint ignores n
    assert endpoint.calls == [(3, 0), (None, 1), (None, 2)]


def test_a_refused_n_is_told_apart_by_one_plain_call_then_fans_out():
    refused = UpstreamHTTPError(400, "unknown parameter n")
    endpoint = Endpoint(refused, ["a", "b", "c"])
    got = both(endpoint, 3)
    assert got.received == ["a", "b", "c"]
    assert got.failures == [] and got.refused is refused and got.errors == [refused]
    assert not got.native and got.calls == 4
    assert endpoint.calls == [(3, 0), (None, 0), (None, 1), (None, 2)]


def test_a_request_refused_outright_costs_one_call():
    refused = UpstreamHTTPError(400, "bad messages")
    endpoint = Endpoint(refused, ["never asked"])
    got = both(endpoint, 4)
    assert got.received == [] and got.failures == [refused] and got.refused is None
    assert endpoint.calls == [(4, 0)]  # no plain call, nor four more that would fail alike


@pytest.mark.parametrize(
    ("error", "about_n"),
    [
        (UpstreamHTTPError(400, "'n' must be 1 for this model"), True),
        (UpstreamHTTPError(422, "n: only 1 is supported"), True),
        (UpstreamHTTPError(400, "x", body={"error": {"message": "x", "param": "n"}}), True),
        (UpstreamHTTPError(400, "invalid n-gram", body={"error": {"param": "messages"}}), False),
        (UpstreamHTTPError(400, "temperature is not a number"), False),
        (UpstreamHTTPError(404, "no model named n"), False),
    ],
)
def test_only_a_refusal_of_n_is_checked_with_a_plain_call(
    error: UpstreamHTTPError, about_n: bool
) -> None:
    endpoint = Endpoint(error, ["a", "b"])
    got = both(endpoint, 2)
    assert (got.refused is error) is about_n
    assert len(endpoint.calls) == (3 if about_n else 1)


def test_a_native_call_whose_retries_ran_out_is_raised():
    down = UpstreamHTTPError(503, "overloaded")
    with pytest.raises(UpstreamHTTPError, match="503"):
        collect(Endpoint(down, ["a"]), 2)
    with pytest.raises(UpstreamHTTPError, match="503"):
        asyncio.run(acollect(Endpoint(down, ["a"]).acall, 2))


def test_failed_single_calls_are_failures_and_the_rest_still_count():
    lost = UpstreamHTTPError(500, "boom")
    got = both(Endpoint([], ["a", lost]), 2, native=False)
    assert got.received == ["a"] and got.failures == [lost]
    assert got.metadata(2) == {
        "n_requested": 2,
        "n_received": 1,
        "failures": 1,
        "errors": ["upstream answered 500: boom"],
        "upstream_calls": 2,
        "native_n": False,
    }


def test_one_candidate_is_one_plain_call():
    endpoint = Endpoint(["x", "y"], ["a"])
    assert both(endpoint, 1).received == ["a"]
    assert endpoint.calls == [(None, 0)]


def test_sync_single_calls_see_the_callers_context():
    who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    who.set("caller")
    got = collect(lambda n, k: [who.get()], 3, native=False)
    assert got.received == ["caller"] * 3


def test_seeds_step_by_the_candidate_index_and_other_seeds_pass_as_given():
    assert [seed_for(7, k) for k in range(3)] == [7, 8, 9]
    assert seed_for(None, 2) is None and seed_for(True, 2) is True and seed_for("s", 1) == "s"


def test_error_descriptions_and_parameter_refusals():
    assert describe_error(UpstreamHTTPError(429, "slow down")) == "upstream answered 429: slow down"
    assert describe_error(ValueError("x" * 400)).endswith("...")
    assert len(describe_error(ValueError("x" * 400))) == 300
    assert describe_error(TimeoutError()) == "TimeoutError"
    refusal = UpstreamHTTPError(400, "bad request", body={"error": {"param": "logprobs"}})
    assert names_parameter(refusal, "logprobs")
    assert not names_parameter(UpstreamHTTPError(500, "logprobs broke"), "logprobs")
    assert not names_parameter(UpstreamHTTPError(400, "bad seed"), "logprobs")


def test_a_refusal_that_is_not_about_n_stops_at_once():
    missing = UpstreamHTTPError(404, "no such model")
    endpoint = Endpoint(missing, ["never asked"])
    got = both(endpoint, 3)
    assert got.received == [] and got.failures == [missing]
    assert endpoint.calls == [(3, 0)]


def test_an_error_without_a_status_is_told_apart_by_a_plain_call():
    endpoint = Endpoint(NotImplementedError("n > 1"), ["a", "b"])
    got = both(endpoint, 2)
    assert got.received == ["a", "b"] and isinstance(got.refused, NotImplementedError)
