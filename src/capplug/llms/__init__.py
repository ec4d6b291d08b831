"""Getting candidate responses and likelihoods from chat models; the local model runtime.

Names are imported on first use, so ``capplug.llms.retry`` stays light (no torch import) for the
HTTP front ends that only need the retry policy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and the layout test follow; imported on first use below
    from capplug.llms.local import (
        CAPPY_RECIPE,
        FAST_RECIPE,
        RECIPES,
        Candidate,
        LocalChatModel,
        SamplingRecipe,
        SamplingStrategy,
    )
    from capplug.llms.retry import DEFAULT_RETRY, RetryPolicy, UpstreamHTTPError

_EXPORTS = {
    "CAPPY_RECIPE": "capplug.llms.local",
    "FAST_RECIPE": "capplug.llms.local",
    "RECIPES": "capplug.llms.local",
    "Candidate": "capplug.llms.local",
    "LocalChatModel": "capplug.llms.local",
    "SamplingRecipe": "capplug.llms.local",
    "SamplingStrategy": "capplug.llms.local",
    "DEFAULT_RETRY": "capplug.llms.retry",
    "RetryPolicy": "capplug.llms.retry",
    "UpstreamHTTPError": "capplug.llms.retry",
}

__all__ = [
    "CAPPY_RECIPE",
    "DEFAULT_RETRY",
    "FAST_RECIPE",
    "RECIPES",
    "Candidate",
    "LocalChatModel",
    "RetryPolicy",
    "SamplingRecipe",
    "SamplingStrategy",
    "UpstreamHTTPError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'capplug.llms' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
