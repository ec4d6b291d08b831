"""Fit the selection weights from candidate sets whose quality is known.

A set is one instruction's candidates with each candidate's quality (Rouge-L against the
reference, a human label, an option's target score) and whatever signals it has. Weights are
fitted for every subset of the signals that contains at least one, so a candidate set missing a
signal at selection time uses weights fitted without it. ``group`` (a task, or a task family)
lets every group weigh the same, however many sets it has.

    rows = [{"instruction": "...", "candidates": [...], "quality": [...], "logprobs": [...]}, ...]
    combiner = fit_combiner(candidate_sets(rows, scorer))
    write_combiner(combiner, "runs/my-scorer")   # into that checkpoint's config.json
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner, fit_weights
from capplug.selection.core import check_logprobs, score_distinct, signal_values

__all__ = ["CandidateSet", "candidate_sets", "fit_combiner", "pick_quality", "write_combiner"]


@dataclass(frozen=True)
class CandidateSet:
    """One instruction's candidates: their transformed signals and their quality."""

    values: Mapping[str, np.ndarray]
    quality: np.ndarray
    group: str = ""


def candidate_sets(rows: Iterable[Mapping[str, Any]], scorer: Any = None) -> list[CandidateSet]:
    """Sets from rows of ``instruction``, ``candidates``, ``quality`` (or ``reference``),
    optional ``logprobs``, ``token_counts`` and ``group``; scored by ``scorer`` when given.

    Raises:
        ValueError: naming the row and the field, for malformed rows.
    """
    from capplug.data.labels import rouge_l

    out = []
    for n, row in enumerate(rows, start=1):
        where = f"row {n}"
        texts = row.get("candidates")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: candidates must be a non-empty list of strings")
        if "quality" in row:
            quality = check_logprobs(row["quality"], len(texts), argument=f"{where}: quality")
        elif isinstance(row.get("reference"), str | list):
            quality = np.array([rouge_l(t, row["reference"]) for t in texts])
        else:
            raise ValueError(f"{where}: give quality (one number per candidate) or a reference")
        if quality is None:
            raise ValueError(f"{where}: quality must be numbers, one per candidate")
        logprobs = check_logprobs(row.get("logprobs"), len(texts), argument=f"{where}: logprobs")
        counts = check_logprobs(
            row.get("token_counts"), len(texts), argument=f"{where}: token_counts"
        )
        scores = None
        if scorer is not None:
            scores = score_distinct(scorer.score, row.get("instruction", ""), texts)
        values = signal_values(
            texts,
            scores=scores,
            logprobs=logprobs,
            token_counts=counts,
            instruction=row.get("instruction"),
        )
        out.append(CandidateSet(values, quality, str(row.get("group", ""))))
    return out


def fit_combiner(
    sets: Sequence[CandidateSet],
    *,
    temperature: float = 0.05,
    l2: float = 1e-2,
    subsets: Iterable[Sequence[str]] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Combiner:
    """Weights for every subset of the signals present in all of ``sets`` (or ``subsets``)."""
    if not sets:
        raise ValueError("sets must hold at least one candidate set")
    present = [s for s in SIGNALS if all(s in c.values for c in sets)]
    if subsets is None:
        subsets = [
            combo
            for r in range(1, len(present) + 1)
            for combo in itertools.combinations(present, r)
            if "logprob_mean" not in combo or "logprob" in combo
        ]
    size: dict[str, int] = {}
    for c in sets:
        size[c.group] = size.get(c.group, 0) + 1
    share = [1.0 / size[c.group] for c in sets]
    weights = {}
    for subset in subsets:
        subset = tuple(subset)
        weights["+".join(sorted(subset))] = fit_weights(
            [({k: c.values[k] for k in subset}, c.quality) for c in sets],
            subset,
            temperature=temperature,
            l2=l2,
            set_weights=share,
        )
    return Combiner(weights, {"temperature": temperature, "l2": l2, **(info or {})})


def pick_quality(sets: Sequence[CandidateSet], weights: Mapping[str, float]) -> float:
    """Mean quality of the candidate the weights pick: per group, then over groups."""
    combiner = Combiner({"+".join(sorted(weights)): dict(weights)})
    per_group: dict[str, list[float]] = {}
    for c in sets:
        fused, _ = combiner.fuse({k: c.values[k] for k in weights})
        per_group.setdefault(c.group, []).append(float(c.quality[int(np.argmax(fused))]))
    return float(np.mean([np.mean(v) for v in per_group.values()]))


def write_combiner(combiner: Combiner, checkpoint: str | os.PathLike[str]) -> Path:
    """Store ``combiner`` in a scorer checkpoint folder's ``config.json`` (atomically)."""
    from capplug._cache import write_json_atomic

    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} holds no config.json: not a scorer checkpoint")
    config = json.loads(path.read_text())
    config[CONFIG_KEY] = combiner.to_config()
    write_json_atomic(path, config)
    return path
