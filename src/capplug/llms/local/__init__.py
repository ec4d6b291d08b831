"""A local Hugging Face chat model: chat-template rendering, candidate sampling, log-likelihoods."""

from capplug.llms.local.model import (
    CAPPY_RECIPE,
    DEFAULT_MODEL,
    FAST_RECIPE,
    RECIPES,
    Candidate,
    LocalChatModel,
    SamplingRecipe,
    SamplingStrategy,
)

__all__ = [
    "CAPPY_RECIPE",
    "DEFAULT_MODEL",
    "FAST_RECIPE",
    "RECIPES",
    "Candidate",
    "LocalChatModel",
    "SamplingRecipe",
    "SamplingStrategy",
]
