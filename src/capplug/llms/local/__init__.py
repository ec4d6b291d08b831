"""A local Hugging Face chat model: chat-template rendering, candidate sampling, log-likelihoods.

:class:`LocalChatModel` loads any causal LM that ``capplug.models.resolve`` can find (the packaged
SmolLM2-135M-Instruct by default) and offers three things the rest of capplug needs:

- :meth:`~LocalChatModel.sample_candidates`: n candidate responses per instruction, by Cappy's
  recipe by default (:data:`CAPPY_RECIPE`), batched across prompts and reproducible;
- :meth:`~LocalChatModel.log_likelihood`: log-probabilities of given continuations, for the LM
  baselines (multiple choice by likelihood, self-scoring of candidates);
- :meth:`~LocalChatModel.generate`: plain batched greedy or sampled answers.

Sampled candidates do not depend on which other prompts share their batch: every sampled row
draws from its own random generator, seeded from ``seed``, the rendered prompt, the strategy
and the sample's index, and the token is picked by inverse-CDF sampling inside a logits
processor, so batch composition only matters through float round-off in the logits.

- ``model``: :class:`LocalChatModel`: loading, prompts, log-likelihoods and plain answers;
- ``recipes``: :class:`SamplingStrategy`, :class:`SamplingRecipe`, the recipes and
  :class:`Candidate`;
- ``_candidates``: :meth:`~LocalChatModel.sample_candidates` and the batching behind it;
- ``_decoding``: the per-row sampler, the neutral generation config, end-of-turn tokens.
"""

from capplug.llms.local.model import DEFAULT_MODEL, LocalChatModel
from capplug.llms.local.recipes import (
    CAPPY_RECIPE,
    FAST_RECIPE,
    RECIPES,
    Candidate,
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
