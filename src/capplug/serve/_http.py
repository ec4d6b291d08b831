"""What capplug's HTTP servers share: OpenAI-shaped errors, a body-size cap and an API-key check.

Every error a capplug server sends is OpenAI's error object,
``{"error": {"message", "type", "param", "code"}}``, so the ``openai`` SDK and LangChain raise
their usual exception classes with a readable message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "BEARER",
    "APIError",
    "BodyLimit",
    "ClientGone",
    "KeyHeader",
    "RequireKey",
    "SafePath",
    "check_json_value",
    "check_positive_int",
    "error_response",
    "install_error_handlers",
    "json_path",
    "read_json_object",
    "redact_access_log",
    "unless_disconnected",
]


_log = logging.getLogger("capplug.serve")

# --------------------------------------------------------------------------------- errors


class APIError(Exception):
    """A request a server refuses, with OpenAI's error fields; the handler answers with them."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error JSON with ``status``; ``type`` defaults by status class."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(
        exc.status,
        exc.message,
        param=exc.param,
        code=exc.code,
        kind=exc.kind,
        headers=exc.headers,
    )


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
        return error_response(404, message, code="unknown_url", headers=headers)
    if exc.status_code == 405:
        message = f"Method not allowed ({request.method} {request.url.path})"
        return error_response(405, message, code="method_not_allowed", headers=headers)
    if exc.status_code == 413:
        return error_response(413, str(exc.detail), code="request_too_large")
    return error_response(exc.status_code, str(exc.detail), headers=headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> Response:
    # The details go to the server's log, never to the client: an exception's text can carry
    # paths, keys or the request's own content.
    incident = secrets.token_hex(6)
    _log.error(
        "%s %s failed (incident %s)",
        request.method,
        request.url.path,
        incident,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(
        500,
        f"the server failed (incident {incident}); its log has the details",
        code="server_error",
    )


# ----------------------------------------------------------------------------- access log

_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:[^=&]*(?:key|token|secret|password|passwd|auth|sig|signature|credential)"
    r"[^=&]*)=)[^&#\s]*"
)


def redact_query(path: str) -> str:
    """``path`` with the values of query parameters that look like secrets (``api-key``,
    ``access_token``, ``sig``, ...) replaced by ``***``."""
    return _SECRET_PARAM.sub(r"\1***", path)


class _RedactQuery(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Keep secrets sent in a query string (``?api-key=...``, as Azure clients do) out of
    uvicorn's access log. Idempotent; survives uvicorn's own logging set-up."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactQuery) for f in access.filters):
        access.addFilter(_RedactQuery())


def install_error_handlers(app: FastAPI) -> None:
    """Answer :class:`APIError`, Starlette's HTTP errors (404, 405, 413) and crashes as OpenAI does."""
    redact_access_log()  # every server installs these handlers, so every server gets it
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ClientGone, _on_client_gone)
    # A body cut short by the client (a pass-through's upload, a dropped connection): nobody is
    # left to answer, and it is not the server's failure.
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)


# ---------------------------------------------------------------------- client disconnects

T = TypeVar("T")

# nginx's status for "the client closed the request": logged and counted, never seen by anyone
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work for it was cancelled."""


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    _log.info(
        "%s %s: the client went away; its work was cancelled", request.method, request.url.path
    )
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled the moment the client disconnects (then :class:`ClientGone`).

    Call it once the request body has been read: it listens on the request's ``receive`` for
    ``http.disconnect``, so nothing else may read the body meanwhile. Upstream calls, retries
    and their backoff sleeps inside ``work`` stop with it, so an abandoned request costs no
    further upstream attempts.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)  # let both finish unwinding
    if task.cancelled():
        raise ClientGone()
    return task.result()


# ---------------------------------------------------------------------------- body limit


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes; send less"


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or as they stream in.

    A body that streams in without a Content-Length is counted as it is read: the read that
    crosses the limit raises Starlette's ``HTTPException(413)``, which the installed handler
    answers (code that forwards the body elsewhere must let that exception through).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(
                413, _too_large_message(self.max_bytes), code="request_too_large"
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading; the handler answers 413.
                    raise StarletteHTTPException(413, _too_large_message(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------- paths

_MAX_UNQUOTE = 4  # %25 nested deeper than this is refused outright


_U_ESCAPE = re.compile(r"%u([0-9a-fA-F]{4})")
# Control, format (bidi overrides such as U+202E), line and paragraph separator characters.
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def unsafe_path_reason(raw_path: str) -> str | None:
    """Why a request path may not be served or forwarded, or None when it may.

    A segment is refused when, decoded once or as often as it decodes (``%xx``, and IIS's
    ``%uXXXX``), it or its part before a ``;`` (Tomcat's path parameters: ``..;`` is ``..``
    there) is ``.`` or ``..``, or it holds a ``/``, a ``\\``, or a control, format (bidi) or
    separator character; an empty segment inside the path (``/v1//host/x``) is refused too. Any
    of them can move a forwarded request out of the upstream's base path, however the upstream
    or an HTTP library in between normalises it. API paths never need them.
    """
    segments = raw_path.split("/")
    for position, segment in enumerate(segments):
        if not segment and 0 < position < len(segments) - 1:
            return "the path has an empty segment ('//')"
        text = segment
        for _ in range(_MAX_UNQUOTE + 1):
            if text in (".", "..") or text.split(";", 1)[0] in (".", ".."):
                return f"the path segment '{segment}' moves up or stays in place"
            if "/" in text or "\\" in text:
                return f"the path segment '{segment}' holds a separator"
            if any(unicodedata.category(c) in _INVISIBLE for c in text):
                return f"the path segment '{segment}' holds a control or bidi character"
            decoded = urllib.parse.unquote(_U_ESCAPE.sub(_u_char, text), errors="strict")
            if decoded == text:
                break
            text = decoded
        else:
            return f"the path segment '{segment}' is percent-encoded too many times"
    return None


def _u_char(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


class SafePath:
    """Refuse, with a 400 before any route runs, a path that :func:`unsafe_path_reason`
    refuses: checked on the path exactly as the client sent it, and as decoded."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            try:
                sent = raw.decode("ascii")
                reason = unsafe_path_reason(sent) or unsafe_path_reason(scope["path"])
            except UnicodeError:
                reason = "the path is not ASCII percent-encoded UTF-8"
            if reason is not None:
                response = error_response(400, f"Invalid URL path: {reason}", code="invalid_path")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------- API key


@dataclass(frozen=True)
class KeyHeader:
    """A header that may carry a server's API key: ``name: <prefix><key>``."""

    name: str
    prefix: str = ""

    def expected(self, api_key: str) -> bytes:
        return f"{self.prefix}{api_key}".encode()

    def example(self) -> str:
        return f"'{self.name}: {self.prefix}<key>'"


BEARER = KeyHeader("Authorization", "Bearer ")


class RequireKey:
    """Ask for the server's API key on the paths that ``headers_for(path)`` gives headers for.

    ``headers_for`` returns the headers that may carry the key on that path (any one will do);
    an empty list leaves the path open. Keys are compared in constant time, and a refused
    request is answered 401 before anything else runs.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        *,
        headers_for: Callable[[str], Sequence[KeyHeader]],
        what: str = "API key",
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.headers_for = headers_for
        self.what = what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            accepted = self.headers_for(scope["path"])
            if accepted and not self._authorised(scope, accepted):
                ways = " or ".join(header.example() for header in accepted)
                response = error_response(
                    401,
                    f"missing or wrong {self.what}; send the header {ways}",
                    code="invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope, accepted: Sequence[KeyHeader]) -> bool:
        sent: dict[bytes, bytes] = {}
        for key, value in scope.get("headers", ()):
            sent.setdefault(key, value)  # the first of repeated headers counts
        ok = False
        for header in accepted:
            given = sent.get(header.name.lower().encode(), b"")
            # Every accepted header is compared, so timing does not tell which one was close.
            ok |= secrets.compare_digest(given, header.expected(self.api_key))
        return ok


# ----------------------------------------------------------------------------------- JSON

# Deeper than any request OpenAI's API defines (a tool's JSON schema nests a few levels); a
# body nested deeper is refused before anything walks it recursively.
MAX_JSON_DEPTH = 64


def json_path(parts: Sequence[str | int]) -> str:
    """``messages[0].content`` for ``("messages", 0, "content")``: how OpenAI names a field."""
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _too_deep(depth: int, where: str) -> str:
    return f"the request body nests deeper than {depth} levels at {where}; send flatter JSON"


def check_json_value(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse, with a 400 naming where, a parsed JSON value that nests deeper than ``max_depth``
    or holds text that is not Unicode (a lone surrogate such as ``"\\ud800"``: JSON can spell it,
    UTF-8 cannot carry it, and a tokenizer or the upstream fails on it). Walks without
    recursion, so any depth is safe to check."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if len(where) > max_depth:
            place = f"'{json_path(where[:8])}...'"
            raise APIError(400, _too_deep(max_depth, place), code="invalid_body")
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, where)
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, i)) for i, child in enumerate(item))


def _check_text(text: str, where: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        param = json_path(where) or None
        place = f"'{param}'" if param else "the request body"
        raise APIError(
            400,
            f"Invalid value for {place}: the text holds a lone UTF-16 surrogate "
            f"(\\u{ord(text[error.start]):04x} at character {error.start}), which is not "
            "Unicode; send valid UTF-8 text",
            param=param,
            code="invalid_value",
        ) from None


def read_json_object(raw: bytes, *, what: str = "a JSON object") -> dict[str, Any]:
    """A request body as a dict, checked by :func:`check_json_value`; a 400 for anything else."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(
            400, _too_deep(MAX_JSON_DEPTH, "the request body"), code="invalid_body"
        ) from None
    except ValueError as error:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise APIError(
            400,
            f"the request body is not valid JSON ({error}); send one JSON object",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be {what}", code="invalid_body")
    check_json_value(body)
    return body


# --------------------------------------------------------------------------------- checks


def check_positive_int(value: Any, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
