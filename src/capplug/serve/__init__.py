"""capplug's HTTP servers: a local OpenAI-compatible chat endpoint, the reranking proxy, the
adapter service, and running apps in a thread.

Needs the ``serve`` extra: ``pip install 'capplug[serve]'`` (FastAPI, uvicorn, httpx2 and
prometheus-client).
"""

try:
    import fastapi  # noqa: F401
    import httpx2  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "capplug.serve needs FastAPI, uvicorn, httpx2 and prometheus-client, which come with "
        "the serve extra: pip install 'capplug[serve]'"
    ) from exc

from typing import TYPE_CHECKING

from capplug.serve.background import serve_in_thread
from capplug.serve.local_openai import create_app
from capplug.serve.proxy import KEY_HEADER, create_proxy_app

if TYPE_CHECKING:  # imported on first use below
    from capplug.serve.adapter_service import create_adapter_app

__all__ = [
    "KEY_HEADER",
    "create_adapter_app",
    "create_app",
    "create_proxy_app",
    "serve_in_thread",
]


def __getattr__(name: str) -> object:
    # The adapter service needs the adapters extra (peft, chromadb); import it on first use.
    if name == "create_adapter_app":
        from capplug.serve.adapter_service import create_adapter_app

        return create_adapter_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
