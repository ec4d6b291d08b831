"""A selector for judged-fallback tests, importable by worker processes too (no test here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class PickingSelector:
    """Picks candidate ``pick`` (the judge's candidates are ``[adapter, base]``), scoring it
    ``score`` and the other ``1 - score``, and keeps what it was asked in ``calls``."""

    def __init__(self, pick: int, *, score: float = 0.8, name: str = "fake-judge") -> None:
        self.pick = pick
        self.score = score
        self.calls: list[tuple[Any, list[str]]] = []
        self.scorer = SimpleNamespace(name=name)

    def select(self, instruction: Any, candidates: list[str]) -> Any:
        self.calls.append((instruction, list(candidates)))
        scores = [
            self.score if i == self.pick else 1.0 - self.score for i in range(len(candidates))
        ]
        return SimpleNamespace(
            index=self.pick, candidates=[SimpleNamespace(score=s) for s in scores]
        )
