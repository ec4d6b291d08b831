"""capplug's HTTP servers: a local OpenAI-compatible chat endpoint, the reranking proxy, and
running apps in a thread.

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

from capplug.serve.background import serve_in_thread
from capplug.serve.local_openai import create_app
from capplug.serve.proxy import KEY_HEADER, create_proxy_app

__all__ = ["KEY_HEADER", "create_app", "create_proxy_app", "serve_in_thread"]
