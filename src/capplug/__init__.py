"""capplug: a small scorer that reranks LLM answers, and instruction-to-adapter LoRAs.

Names are imported on first use, so ``import capplug`` (and the ``capplug`` command's start,
``capplug --help`` say) does not load torch until a scorer or reranker is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from capplug.errors import CapplugError, CheckpointError, ModelNotFoundError, PackageFetchError

if TYPE_CHECKING:
    from capplug.chat import flatten_chat
    from capplug.errors import TruncationWarning
    from capplug.models import resolve
    from capplug.scoring import Ranked, Scorer
    from capplug.selection import Reranker, Scored, Selection

__version__ = "0.1.0"

_LAZY = {
    "Ranked": "capplug.scoring",
    "Reranker": "capplug.selection",
    "Scored": "capplug.selection",
    "Scorer": "capplug.scoring",
    "Selection": "capplug.selection",
    "TruncationWarning": "capplug.errors",
    "flatten_chat": "capplug.chat",
    "resolve": "capplug.models",
}

__all__ = [
    "CapplugError",
    "CheckpointError",
    "ModelNotFoundError",
    "PackageFetchError",
    "Ranked",
    "Reranker",
    "Scored",
    "Scorer",
    "Selection",
    "TruncationWarning",
    "__version__",
    "flatten_chat",
    "resolve",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'capplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
