"""capplug's HTTP servers: a local OpenAI-compatible chat endpoint; running apps in a thread.

Needs the ``serve`` extra: ``pip install 'capplug[serve]'`` (FastAPI and uvicorn).
"""

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "capplug.serve needs FastAPI and uvicorn, which come with the serve extra: "
        "pip install 'capplug[serve]'"
    ) from exc

from capplug.serve.background import serve_in_thread
from capplug.serve.local_openai import create_app

__all__ = ["create_app", "serve_in_thread"]
