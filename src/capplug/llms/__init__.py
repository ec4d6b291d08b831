"""Getting candidate responses and likelihoods from chat models; the local model runtime."""

from capplug.llms.local import (
    CAPPY_RECIPE,
    Candidate,
    LocalChatModel,
    SamplingRecipe,
    SamplingStrategy,
)

__all__ = [
    "CAPPY_RECIPE",
    "Candidate",
    "LocalChatModel",
    "SamplingRecipe",
    "SamplingStrategy",
]
