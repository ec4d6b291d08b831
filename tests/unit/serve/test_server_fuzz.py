"""Hostile requests, generated: the reranking proxy and the adapter service answer every one
with a 2xx or a 4xx, never a 5xx, never a traceback in their logs.

Bodies are chat requests with any part replaced by any JSON (lone surrogates, deep nesting,
huge numbers, wrong types), raw bytes that are not JSON at all, and paths built from segments
that try to climb out (``..`` in every encoding, separators, control characters). CI runs a
few hundred of each; ``benchmarks/server_fuzz.py`` runs them at ``CAPPLUG_FUZZ_EXAMPLES=2000``
and reports the statuses seen (``CAPPLUG_FUZZ_REPORT`` names where the counts go).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fake_upstream import Upstream, proxy
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_adapter_service import _fuzz_app
from test_proxy_hostile import send_raw_path

EXAMPLES = int(os.environ.get("CAPPLUG_FUZZ_EXAMPLES", "150"))
REPORT = os.environ.get("CAPPLUG_FUZZ_REPORT")

# ------------------------------------------------------------------------------ strategies

_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_text = st.one_of(
    st.text(max_size=40),
    st.text(st.one_of(st.characters(), _surrogates), max_size=12),
    st.sampled_from(["user", "assistant", "system", "tool", "m", "", " ", "\x00", "\ud800"]),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    _text,
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def _deep(draw: st.DrawFn) -> Any:
    depth = draw(st.integers(min_value=50, max_value=800))  # json.dumps' own recursion bound
    kind = draw(st.sampled_from(["list", "dict"]))
    value: Any = draw(_scalars)
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


_any_json = st.one_of(_json, _deep())
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), _any_json)},
    optional={"content": _any_json, "name": _any_json, "tool_calls": _any_json},
)
_chat = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_message, max_size=4), _any_json)},
    optional={
        "model": st.one_of(st.just("m"), _any_json),
        "n": _any_json,
        "max_tokens": _any_json,
        "temperature": _any_json,
        "stream": _any_json,
        "stream_options": _any_json,
        "logprobs": _any_json,
        "stop": _any_json,
        "seed": _any_json,
        "tools": _any_json,
        "instruction": _any_json,
        "metadata": _any_json,
    },
)
_adapter = st.fixed_dictionaries(
    {"instruction": st.one_of(_text, _any_json)},
    optional={"threshold": _any_json, "extra": _any_json},
)


_rerank = st.fixed_dictionaries(
    {"query": st.one_of(_text, _any_json), "documents": st.one_of(st.lists(_text), _any_json)},
    optional={
        "top_n": _any_json,
        "return_documents": _any_json,
        "rank_fields": _any_json,
        "text_1": st.one_of(_text, st.lists(_text), _any_json),
        "text_2": st.one_of(_text, st.lists(_text), _any_json),
    },
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()  # lone surrogates as \udXXX escapes


@st.composite
def _deep_raw(draw: st.DrawFn) -> bytes:
    """Nesting deeper than any recursive walk survives, spelled out as text."""
    depth = draw(st.integers(min_value=1000, max_value=100_000))
    open_, close = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    nested = open_ * depth + b"1" + close * depth
    where = draw(
        st.sampled_from(
            [
                b"%s",
                b'{"messages": %s}',
                b'{"messages": [{"role": "user", "content": %s}]}',
                b'{"messages": [], "metadata": %s}',
            ]
        )
    )
    return where % nested


_bodies = st.one_of(
    _deep_raw(),
    _chat.map(_encode),
    _adapter.map(_encode),
    _rerank.map(_encode),
    _any_json.map(_encode),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b'{"messages": [', b"\xff\xfe{}", b"[" * 10_000, b"null"]),
)
_segments = st.one_of(
    st.sampled_from(
        [
            "..",
            ".",
            "%2e%2e",
            "%2E%2e",
            ".%2e",
            "%252e%252e",
            "..%2f..",
            "%2f",
            "%5c",
            "..\\",
            "%00",
            "%0a",
            "%0d%0a",
            "%c0%ae%c0%ae",
            "%e2%80%ae",
            "models",
            "adapters",
            "files",
            "chat",
            "completions",
            "v1",
            "0123456789abcdef",
            "%20",
            "~",
            "%",
            "%zz",
            "%ff",
        ]
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8).map(
        lambda s: urllib.parse.quote(s, safe="")
    ),
)
_paths = st.lists(_segments, min_size=1, max_size=6).map(lambda parts: "/v1/" + "/".join(parts))


# ---------------------------------------------------------------------------------- servers


class Seen:
    """Statuses per server, and whatever was logged at ERROR or with a traceback."""

    def __init__(self) -> None:
        self.statuses: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter
        )
        self.failures: list[str] = []

    def check(self, server: str, what: str, status: int, records: list[logging.LogRecord]) -> None:
        self.statuses[server][status] += 1
        bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
        if status >= 500 or bad:
            logged = "; ".join(r.getMessage() for r in bad)
            self.failures.append(f"{server}: {what[:200]!r} -> {status} {logged}")


SEEN = Seen()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    if REPORT:
        counts = {s: dict(sorted(c.items())) for s, c in SEEN.statuses.items()}
        Path(REPORT).write_text(json.dumps({"statuses": counts, "failures": SEEN.failures}))


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _recording() -> Recorder:
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    return recorder


@pytest.fixture(scope="module")
def proxy_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    feedback = tmp_path_factory.mktemp("fuzz-feedback") / "feedback.sqlite3"
    with proxy(Upstream(), n=2, feedback=feedback) as client:
        yield client


@pytest.fixture(scope="module")
def service_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(
        _fuzz_app(tmp_path_factory), headers={"Authorization": "Bearer fuzz-key"}
    ) as client:
        yield client


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    # the same examples on every CI run; the benchmark (which sets the count) explores anew
    derandomize="CAPPLUG_FUZZ_EXAMPLES" not in os.environ,
)
_JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("server", ["proxy", "service"])
@pytest.mark.parametrize(
    "route",
    [
        "/v1/chat/completions",
        "/v1/adapters",
        "/v1/rerank",
        "/v1/score",
        "/v1/responses",
        "/v1/feedback",
    ],
)
def test_generated_bodies_never_get_a_5xx(
    server: str, route: str, request: pytest.FixtureRequest
) -> None:
    client: TestClient = request.getfixturevalue(f"{server}_client")

    @_SETTINGS
    @given(body=_bodies)
    def fuzz(body: bytes) -> None:
        recorder = _recording()
        try:
            response = client.post(route, content=body, headers=_JSON)
        finally:
            logging.getLogger().removeHandler(recorder)
        SEEN.check(server, body.decode("latin-1"), response.status_code, recorder.records)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}  # OpenAI's error JSON

    fuzz()
    assert not SEEN.failures, SEEN.failures[:5]


@pytest.mark.parametrize("server", ["proxy", "service"])
def test_generated_paths_never_get_a_5xx_or_climb(
    server: str, request: pytest.FixtureRequest
) -> None:
    client: TestClient = request.getfixturevalue(f"{server}_client")
    headers = {"Authorization": "Bearer fuzz-key"} if server == "service" else {}

    @_SETTINGS
    @given(path=_paths, method=st.sampled_from(["GET", "POST", "DELETE"]), body=_bodies)
    def fuzz(path: str, method: str, body: bytes) -> None:
        recorder = _recording()
        try:
            status = send_raw_path(client.app, path, method, body, {**headers, **_JSON})[0]
        finally:
            logging.getLogger().removeHandler(recorder)
        SEEN.check(server, f"{method} {path}", status, recorder.records)
        assert status < 500, (method, path)

    fuzz()
    assert not SEEN.failures, SEEN.failures[:5]


def test_the_proxy_forwards_nothing_outside_its_base() -> None:
    upstream = Upstream()
    client = proxy(upstream, n=2)

    @_SETTINGS
    @given(path=_paths)
    def fuzz(path: str) -> None:
        send_raw_path(client.app, path)

    fuzz()
    for sent in upstream.requests:
        assert isinstance(sent, httpx2.Request)
        assert sent.url.path.startswith("/v1/"), sent.url
        segments = sent.url.raw_path.split(b"?")[0].split(b"/")
        assert not {b"..", b"."} & set(segments), sent.url
        decoded = urllib.parse.unquote(sent.url.raw_path.decode("ascii"))
        assert "/../" not in decoded + "/", sent.url
