"""How candidates are drawn (:class:`SamplingStrategy`, :class:`SamplingRecipe`, Cappy's
recipe and a cheaper one) and what one drawn candidate is (:class:`Candidate`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CAPPY_RECIPE",
    "FAST_RECIPE",
    "RECIPES",
    "Candidate",
    "SamplingRecipe",
    "SamplingStrategy",
]


@dataclass(frozen=True)
class SamplingStrategy:
    """One way of drawing candidates: beam search, greedy decoding, or sampling with warpers."""

    n: int = 1
    """How many candidates this strategy contributes per prompt."""
    method: Literal["sample", "beam", "greedy"] = "sample"
    temperature: float = 1.0
    """Sampling temperature (``sample`` only); 1.0 leaves the distribution as it is."""
    top_k: int | None = None
    """Keep only the ``top_k`` most likely tokens (``sample`` only); ``None`` or 0: no cut."""
    top_p: float | None = None
    """Nucleus sampling mass (``sample`` only); ``None`` or 1.0: no cut."""
    num_beams: int = 4
    """Beam width (``beam`` only); the ``n`` best finished beams are returned."""

    def __post_init__(self) -> None:
        where = f"SamplingStrategy({self.method!r})"
        if self.method not in ("sample", "beam", "greedy"):
            raise ValueError(
                f"SamplingStrategy.method must be 'sample', 'beam' or 'greedy'; got {self.method!r}"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{where}.n must be an integer >= 1; got {self.n!r}")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise ValueError(
                f"{where}.temperature must be a number > 0 (use method='greedy' for argmax "
                f"decoding); got {self.temperature!r}"
            )
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(f"{where}.top_k must be None or an integer >= 0; got {self.top_k!r}")
        if self.top_p is not None and not (
            isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"{where}.top_p must be None or in (0, 1]; got {self.top_p!r}")
        if (
            isinstance(self.num_beams, bool)
            or not isinstance(self.num_beams, int)
            or self.num_beams < 1
        ):
            raise ValueError(f"{where}.num_beams must be an integer >= 1; got {self.num_beams!r}")
        if self.method == "beam" and self.n > self.num_beams:
            raise ValueError(
                f"{where}.n={self.n} asks for more outputs than num_beams={self.num_beams}; "
                f"raise num_beams or lower n"
            )
        if self.method == "greedy" and self.n != 1:
            raise ValueError(
                f"{where}.n must be 1: greedy decoding gives the same output every time; got {self.n}"
            )

    @property
    def name(self) -> str:
        """A short settings string: ``beam4``, ``greedy``, ``sample``, ``temp0.9``, ``topk40-topp0.95``."""
        if self.method == "beam":
            return f"beam{self.num_beams}"
        if self.method == "greedy":
            return "greedy"
        parts = []
        if self.temperature != 1.0:
            parts.append(f"temp{self.temperature:g}")
        if self.top_k:
            parts.append(f"topk{self.top_k}")
        if self.top_p is not None and self.top_p < 1.0:
            parts.append(f"topp{self.top_p:g}")
        return "-".join(parts) or "sample"


@dataclass(frozen=True)
class SamplingRecipe:
    """The strategies that together make a prompt's candidates, and their length limit."""

    strategies: tuple[SamplingStrategy, ...]
    max_new_tokens: int = 64
    """The most tokens any one candidate may have (its end-of-turn token included)."""

    def __post_init__(self) -> None:
        strategies = self.strategies
        if isinstance(strategies, SamplingStrategy) or not isinstance(strategies, Sequence):
            raise TypeError(
                "SamplingRecipe.strategies must be a list of SamplingStrategy; "
                f"got {type(strategies).__name__}"
            )
        if len(strategies) == 0:
            raise ValueError("SamplingRecipe.strategies must hold at least one SamplingStrategy")
        for i, strategy in enumerate(strategies):
            if not isinstance(strategy, SamplingStrategy):
                raise TypeError(
                    f"SamplingRecipe.strategies[{i}] must be a SamplingStrategy; "
                    f"got {type(strategy).__name__}"
                )
        object.__setattr__(self, "strategies", tuple(strategies))
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(
                f"SamplingRecipe.max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}"
            )

    @property
    def n_candidates(self) -> int:
        """How many candidates the recipe makes per prompt."""
        return sum(s.n for s in self.strategies)


CAPPY_RECIPE = SamplingRecipe(
    strategies=(
        SamplingStrategy(method="beam", n=1, num_beams=4),
        SamplingStrategy(n=4),
        SamplingStrategy(n=4, temperature=0.9),
        SamplingStrategy(n=4, top_k=40),
        SamplingStrategy(n=4, top_p=0.95),
    ),
    max_new_tokens=64,
)
"""Cappy's candidate recipe: 1 beam-search output (4 beams), then 4 each of plain sampling,
temperature 0.9, top-k 40 and top-p 0.95; at most 64 new tokens. Each sampling strategy applies
only its own warper (no top-k 50 default sneaks in)."""

FAST_RECIPE = SamplingRecipe(
    strategies=(
        SamplingStrategy(method="beam", n=1, num_beams=4),
        SamplingStrategy(n=2),
        SamplingStrategy(n=2, temperature=0.9),
        SamplingStrategy(n=2, top_k=40),
        SamplingStrategy(n=2, top_p=0.95),
    ),
    max_new_tokens=48,
)
"""Cappy's recipe at about a third of the cost, for labelling training data on a CPU: the same
strategies with 2 samples each instead of 4 (9 candidates) and at most 48 new tokens."""

RECIPES = {"cappy": CAPPY_RECIPE, "fast": FAST_RECIPE}
"""Recipes by the names the command line uses."""


@dataclass(frozen=True)
class Candidate:
    """One generated response with its log-probability under the model.

    ``sum_logprob`` and ``mean_logprob`` are taken over the generated tokens under the model's
    unmodified next-token distribution (log-softmax of the raw logits, not the temperature- or
    top-k-warped one). The end-of-turn token counts as a generated token when the model stopped
    on its own (``finished``), so an early stop is charged its probability.
    """

    text: str
    """The decoded response, special tokens removed, surrounding whitespace trimmed."""
    strategy: str
    """The settings that drew it (:attr:`SamplingStrategy.name`), e.g. ``beam4`` or ``topp0.95``."""
    sum_logprob: float
    mean_logprob: float
    n_tokens: int
    finished: bool = True
    """False when the candidate was cut at ``max_new_tokens`` instead of ending its turn."""
    token_ids: tuple[int, ...] = field(default=(), repr=False)
    """The generated token ids, end-of-turn token included when ``finished``."""
    token_logprobs: tuple[float, ...] = field(default=(), repr=False)
    """Each generated token's log-probability (as ``sum_logprob`` counts them), in order."""
