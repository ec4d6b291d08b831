"""Run an ASGI app with uvicorn in a background thread, for tests, benchmarks and notebooks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["serve_in_thread"]


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_timeout: float = 30.0,
    shutdown_timeout: float = 10.0,
    log_level: str = "warning",
) -> Iterator[str]:
    """Serve ``app`` on ``host:port`` from a daemon thread; yields its base URL.

    ``port=0`` takes a free port. The socket is bound here, before the thread starts, so the
    port cannot be taken in between; the URL is yielded once the server accepts connections,
    and the server is shut down (open requests finish, up to ``shutdown_timeout`` seconds)
    when the ``with`` block ends.

    Example::

        with serve_in_thread(create_app(model)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")

    Raises:
        RuntimeError: the server did not start within ``startup_timeout`` seconds, or its
            startup failed (the app's lifespan raised, for instance).
    """
    import uvicorn

    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    # log_config=None leaves the process's logging alone; log_level still applies to uvicorn's.
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level=log_level,
        timeout_graceful_shutdown=int(max(1, shutdown_timeout)),
    )
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn exits with SystemExit when startup fails
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn-{bound_port}", daemon=True)
    thread.start()
    try:
        _wait_until_serving(server, thread, failure, bound_host, bound_port, startup_timeout)
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(shutdown_timeout)
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _wait_until_serving(
    server: Any,
    thread: threading.Thread,
    failure: list[BaseException],
    host: str,
    port: int,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if failure or not thread.is_alive():
            cause = failure[0] if failure else None
            raise RuntimeError(
                f"the server on {host}:{port} stopped during startup"
                + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
            ) from cause
        if server.started:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                pass
        time.sleep(0.02)
    raise RuntimeError(f"the server on {host}:{port} did not start within {timeout:g} s")
