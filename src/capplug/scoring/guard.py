"""The guard on adaptation: does an adapted scorer pick better than the one it started from?

Adapting on a handful of examples can make picks worse (a task whose candidates are all alike,
labels that reward the metric's blind spot). Before an adapted scorer is used, both scorers
choose among the candidates of each held-out example (examples the adaptation never saw) and
the labels of their picks are compared. An adapted scorer that does not pick strictly better is
reported as not to be used.

Only held-out examples whose candidates' labels differ count: elsewhere any pick is as good.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from capplug.data.rows import LabelledPair

__all__ = ["GuardReport", "guard", "pick_quality"]


@dataclass(frozen=True)
class GuardReport:
    """How the adapted and the starting scorer pick on held-out examples, and the verdict."""

    default: float | None
    """Mean label of the starting scorer's picks (``None`` with no example to compare on)."""
    adapted: float | None
    """Mean label of the adapted scorer's picks."""
    oracle: float | None
    """Mean label of the best candidate: the most either could reach."""
    examples: int
    """Held-out examples compared (those whose candidates' labels differ)."""
    use: bool
    """Whether the adapted scorer picks strictly better."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_quality(
    scorer: Any, pairs: Sequence[LabelledPair]
) -> tuple[float | None, float | None, int]:
    """``(mean label of the scorer's picks, mean best label, examples)`` over the groups of
    ``pairs`` whose labels differ; ties in score go to the first candidate."""
    groups: dict[str, list[LabelledPair]] = defaultdict(list)
    for pair in pairs:
        groups[pair.group].append(pair)
    picked, best = [], []
    for members in groups.values():
        labels = [p.label for p in members]
        if len(members) < 2 or max(labels) - min(labels) <= 1e-9:
            continue
        scores = scorer.score(members[0].instruction, [p.response for p in members])
        choice = max(range(len(members)), key=lambda i: (scores[i], -i))
        picked.append(labels[choice])
        best.append(max(labels))
    if not picked:
        return None, None, 0
    return sum(picked) / len(picked), sum(best) / len(best), len(picked)


def guard(default: Any, adapted: Any, heldout: Sequence[LabelledPair]) -> GuardReport:
    """Compare ``adapted`` with ``default`` on the held-out pairs (see the module docstring)."""
    before, oracle, count = pick_quality(default, heldout)
    after, _, _ = pick_quality(adapted, heldout)
    if count == 0 or before is None or after is None:
        return GuardReport(
            before,
            after,
            oracle,
            0,
            False,
            "no held-out example has candidates whose labels differ, so there is nothing to "
            "compare on: keep the starting scorer (adapt on more examples, or hold out more "
            "with --heldout)",
        )
    on = f"on {count} held-out examples"
    if after > before:
        reason = f"the adapted scorer picks better {on} ({after:.3f} against {before:.3f}): use it"
    elif after == before:
        reason = (
            f"the adapted scorer picks no better {on} ({after:.3f} each): keep the starting one"
        )
    else:
        reason = (
            f"the adapted scorer picks worse {on} ({after:.3f} against {before:.3f}): "
            "keep the starting one"
        )
    return GuardReport(before, after, oracle, count, after > before, reason)
