"""How per-candidate signals become one choice: a linear model over within-set z-scores.

Each signal is first put on a common footing inside one candidate set (its z-score over the set:
only how a candidate compares with the others counts, never the raw scale, which differs between
models, prompts and APIs). The fused score is a weighted sum of those z-scores, and the
probability that a candidate is the best one is its softmax over the set (a conditional logit).

Weights are fitted per subset of signals, so a missing signal (no log-probabilities from an API,
say) uses weights fitted without it rather than a zero in its place. A second table,
``judged``, holds weights for candidates whose log-likelihoods a local language model computed
(options of a multiple-choice question, or answers from elsewhere judged by
``Reranker(lm=...)``): such log-likelihoods rank fixed texts, not samples the model drew itself,
and weigh differently. They live in the scorer checkpoint's ``config.json`` under
``capplug_selection``: readable, and swappable without code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONFIG_KEY", "SIGNALS", "Combiner", "fit_weights", "zscores"]

CONFIG_KEY = "capplug_selection"
"""The key in a scorer checkpoint's ``config.json`` that holds its selection weights."""

SIGNALS = ("scorer", "agreement", "logprob", "logprob_mean", "length", "echo")
"""Every signal the core knows, in a fixed order.

- ``scorer``: the scorer's score (as a logit);
- ``agreement``: mean Rouge-L F to the other candidates (:mod:`capplug.selection.agreement`);
- ``logprob``: the generator's summed token log-probability of the candidate;
- ``logprob_mean``: the same per token (needs token counts);
- ``length``: log(1 + words), a length prior;
- ``echo``: the share of the candidate's words that repeat the instruction, in order.
"""


def _key(signals: Iterable[str]) -> str:
    return "+".join(sorted(signals))


def zscores(values: np.ndarray) -> np.ndarray:
    """Values standardised within their set; a set with no spread gets zeros."""
    values = np.asarray(values, dtype=float)
    spread = values.std()
    if values.size < 2 or spread < 1e-9:
        return np.zeros_like(values)
    return (values - values.mean()) / spread


@dataclass(frozen=True)
class Combiner:
    """Weights over within-set z-scored signals, one weight set per subset of signals."""

    weights: Mapping[str, Mapping[str, float]]
    """Keyed by the subset's signal names sorted and joined with ``+`` (``"agreement+scorer"``)."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """How the weights were fitted (data, settings, held-out figures); informational."""
    judged: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Weights, keyed as :attr:`weights`, for candidates whose log-likelihoods a local language
    model computed (options it judged, not samples it drew); empty: :attr:`weights` serve."""

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ValueError("weights must map at least one signal subset to its weights")
        if not isinstance(self.judged, Mapping):
            raise ValueError("judged must map signal subsets to their weights")
        _check_tables("weights", self.weights)
        _check_tables("judged", self.judged)

    def subsets(self, *, judged: bool = False) -> list[frozenset[str]]:
        return [frozenset(k.split("+")) for k in self._table(judged)]

    def _table(self, judged: bool) -> Mapping[str, Mapping[str, float]]:
        return self.judged if judged and self.judged else self.weights

    def weights_for(self, available: Iterable[str], *, judged: bool = False) -> dict[str, float]:
        """The weights fitted for exactly ``available``, else for its largest fitted subset;
        ``judged``: from the :attr:`judged` table where it has any.

        When no fitted subset lies within ``available``, the fitted set sharing the most signals
        with it is used with its missing signals dropped (marginalised).
        """
        table = self._table(judged)
        have = frozenset(available)
        exact = table.get(_key(have))
        if exact is not None:
            return dict(exact)
        subsets = self.subsets(judged=judged)
        fitting = [s for s in subsets if s <= have]
        if fitting:
            best = max(fitting, key=lambda s: (len(s), _key(s)))
            return dict(table[_key(best)])
        overlap = max(subsets, key=lambda s: (len(s & have), -len(s - have), _key(s)))
        kept = {n: w for n, w in table[_key(overlap)].items() if n in have}
        if not kept:
            raise ValueError(
                f"no selection weights fit the available signals {sorted(have)}; the combiner "
                f"has weights for {sorted(table)}"
            )
        return kept

    def fuse(
        self, signals: Mapping[str, np.ndarray], *, judged: bool = False
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Fused score per candidate from raw signal arrays (already transformed), and the
        weights (``judged``: log-likelihoods a local LM computed for given texts)."""
        weights = self.weights_for(signals, judged=judged)
        n = len(next(iter(signals.values())))
        total = np.zeros(n)
        for name, weight in weights.items():
            total += weight * zscores(signals[name])
        return total, weights

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 1,
            "weights": {k: dict(v) for k, v in sorted(self.weights.items())},
            "info": dict(self.info),
        }
        if self.judged:
            config["judged"] = {k: dict(v) for k, v in sorted(self.judged.items())}
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Combiner:
        if not isinstance(config, Mapping) or config.get("version") != 1:
            raise ValueError(
                f"{CONFIG_KEY} must be an object with version 1 and weights; got {config!r:.120}"
            )

        def table(value: Any) -> dict[str, dict[str, float]]:
            return {k: {n: float(w) for n, w in v.items()} for k, v in value.items()}

        return cls(
            table(config["weights"]),
            dict(config.get("info", {})),
            table(config.get("judged") or {}),
        )


def _check_tables(name: str, tables: Mapping[str, Mapping[str, float]]) -> None:
    """Each key is signal names sorted and joined with ``+``, with one finite weight per name."""
    for key, table in tables.items():
        names = key.split("+")
        unknown = [n for n in names if n not in SIGNALS]
        if unknown or _key(names) != key:
            raise ValueError(
                f"{name} key {key!r} must be signal names from {SIGNALS} sorted and joined with '+'"
            )
        if set(table) != set(names):
            raise ValueError(f"{name}[{key!r}] must give one weight per signal in its key")
        for signal, value in table.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name}[{key!r}][{signal!r}] must be a finite number")


def fit_weights(
    sets: Sequence[tuple[Mapping[str, np.ndarray], np.ndarray]],
    signals: Sequence[str],
    *,
    temperature: float = 0.05,
    l2: float = 1e-2,
    set_weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Weights for ``signals`` that make the softmax of the fused score pick the best candidates.

    Each set is ``(signal arrays, quality)``: raw transformed signals per candidate and each
    candidate's quality (Rouge-L against the reference, or an option's target score). The target
    distribution is the softmax of quality / ``temperature``; the loss is the cross-entropy of
    the fused softmax against it, averaged over sets (weighted by ``set_weights``, say to let
    every task family count the same), plus ``l2`` times the squared weights.
    """
    try:
        from scipy.optimize import minimize
    except ImportError as exc:
        raise ImportError(
            "fitting selection weights needs scipy: pip install 'capplug[train]'"
        ) from exc

    names = list(signals)
    if set_weights is None:
        set_weights = [1.0] * len(sets)
    if len(set_weights) != len(sets):
        raise ValueError(f"set_weights must have one weight per set; got {len(set_weights)}")
    kept = [
        (s, q, w)
        for (s, q), w in zip(sets, set_weights, strict=True)
        if len(q) >= 2 and np.ptp(q) > 0
    ]
    usable = [(s, q) for s, q, _ in kept]
    if not usable:
        raise ValueError("no candidate set has two candidates of different quality to learn from")
    width = max(len(q) for _, q in usable)
    x = np.zeros((len(usable), width, len(names)))
    target = np.zeros((len(usable), width))
    mask = np.zeros((len(usable), width), dtype=bool)
    share = np.array([w for _, _, w in kept], dtype=float)
    share = share / share.sum()
    for g, (values, quality) in enumerate(usable):
        n = len(quality)
        for k, name in enumerate(names):
            x[g, :n, k] = zscores(values[name])
        t = np.exp((quality - quality.max()) / temperature)
        target[g, :n] = t / t.sum()
        mask[g, :n] = True

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = np.where(mask, x @ w, -np.inf)
        s = s - s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        logp = np.where(mask, np.log(np.maximum(p, 1e-300)), 0.0)
        value = -(share[:, None] * target * logp).sum() + l2 * float(w @ w)
        grad = -np.einsum("g,gn,gnk->k", share, target - p, x) + 2 * l2 * w
        return value, grad

    result = minimize(loss, np.zeros(len(names)), jac=True, method="L-BFGS-B")
    return {name: float(v) for name, v in zip(names, result.x, strict=True)}
