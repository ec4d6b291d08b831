"""The reranking proxy under hostile input and partial failure: every defect found by probing it
gets a test here (text that is not Unicode, bodies nested without end, paths that climb out of
the upstream's base, attempts that multiply across the client boundary)."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_proxy import MESSAGES, Upstream, error_of, ok, post, proxy

from capplug.serve._http import install_error_handlers

KEY = "sk-upstream-secret"


def raw_post(client: Any, body: str, path: str = "/v1/chat/completions") -> httpx2.Response:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


# --------------------------------------------------------------------- text and nesting (D1)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages":[{"role":"user","content":"hi \\ud800"}]}', "messages[0].content"),
        ('{"model":"m\\udfff","messages":[{"role":"user","content":"hi"}]}', "model"),
        (
            '{"messages":[{"role":"user","content":[{"type":"text","text":"\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(body: str, param: str) -> None:
    upstream = Upstream()
    client = proxy(upstream)
    error = error_of(raw_post(client, body), 400)
    assert error["param"] == param and "surrogate" in error["message"]
    assert upstream.requests == []  # nothing went upstream


@pytest.mark.parametrize(
    "body",
    [
        '{"messages":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"messages":[{"role":"user","content":' + "[" * 50_000 + "]" * 50_000 + "}]}",
        '{"messages":[{"role":"user","content":"hi"}],"metadata":'
        + '{"a":' * 5_000
        + "1"
        + "}" * 5_000
        + "}",
        # Deep, but not deep enough for the JSON parser to give up: refused all the same.
        '{"messages":[{"role":"user","content":"hi"}],"metadata":' + "[" * 200 + "]" * 200 + "}",
    ],
)
def test_a_body_nested_without_end_is_a_400_not_a_crash(body: str) -> None:
    upstream = Upstream()
    client = proxy(upstream)
    error = error_of(raw_post(client, body), 400)
    assert "nests deeper" in error["message"]
    assert upstream.requests == []


def test_a_crash_answers_500_without_the_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    # Every capplug server installs the same handlers; a route that crashes stands for any bug.
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail /srv/keys/upstream.txt")

    with caplog.at_level(logging.ERROR, logger="capplug.serve"):
        response = TestClient(app, raise_server_exceptions=False).get("/boom")
    error = error_of(response, 500)
    assert "secret detail" not in response.text and "RuntimeError" not in response.text
    incident = error["message"].split("incident ")[1].split(")")[0]
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


# ------------------------------------------------------------------- paths out of the base (D3)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/%2e%2e/%2e%2e/admin/keys",
        "/v1/%2E%2E/admin",
        "/v1/..%2f..%2fadmin",
        "/v1/models%2f..%2f..%2fsecret",
        "/v1/../admin",
        "/v1/models/../../admin",
        "/v1/%252e%252e/%252e%252e/admin",
        "/v1/models/.",
        "/v1/models%5c..%5c..%5cadmin",
    ],
)
def test_a_path_that_climbs_out_of_the_base_never_reaches_the_upstream(path: str) -> None:
    upstream = Upstream()
    client = proxy(upstream, upstream_api_key=KEY)
    status, body = send_raw_path(client.app, path)  # as `curl --path-as-is` sends it
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_path"
    assert upstream.requests == []
    assert KEY.encode() not in body


def send_raw_path(app: Any, raw_path: str, method: str = "GET") -> tuple[int, bytes]:
    """Call the ASGI app with the path exactly as given: HTTP clients (httpx, the test client)
    resolve ``..`` themselves before sending, servers such as uvicorn do not."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": urllib.parse.unquote(raw_path),
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"proxy.test")],
        "client": ("127.0.0.1", 1),
        "server": ("proxy.test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if "body" in m)


def test_ordinary_pass_through_paths_still_forward_under_the_base() -> None:
    upstream = Upstream()
    client = proxy(upstream, upstream_api_key=KEY)
    ok(client.get("/v1/models"))
    ok(client.get("/v1/files/file-abc.jsonl"))  # a dot inside a segment is fine
    sent = [r.url.path for r in upstream.requests]
    assert sent == ["/v1/models", "/v1/files/file-abc.jsonl"]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in upstream.requests)


def test_messages_still_pass_when_valid() -> None:
    upstream = Upstream()
    ok(post(proxy(upstream), {"model": "m", "messages": MESSAGES}))
    assert json.loads(upstream.requests[0].content)["messages"] == MESSAGES
