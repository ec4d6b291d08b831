"""benchmarks/rerank_picks.py: each scorer's pick per instruction, and its most frequent picks."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest

from capplug.data.bigbench import Example


@pytest.fixture
def picks() -> ModuleType:
    return importlib.import_module("benchmarks.rerank_picks")


class Longest:
    def score(self, instruction: str, responses: list[str]) -> list[float]:
        return [float(len(r)) for r in responses]


class Shortest:
    def score(self, instruction: str, responses: list[str]) -> list[float]:
        return [-float(len(r)) for r in responses]


class Cache:
    def get(self, example: Example) -> list[dict]:
        return [{"text": "C."}, {"text": "A, B, C, D"}, {"text": "B"}]


def test_each_pick_is_shown_with_its_rouge_and_the_hedge_stands_out(picks) -> None:
    test = [Example("t", i, "q", "Q: q\nA: ", "Q: q\nA: ", [ref]) for i, ref in enumerate("CCB")]
    lines = picks.picks_report("t", {"long": Longest(), "short": Shortest()}, Cache(), test, 20)
    assert lines[0] == "t: 3 test instructions"
    # the list of every letter gets partial credit against a one-letter reference
    assert "reference 'C' | long 'A, B, C, D' (40) | short 'B' (0)" in lines
    assert "reference 'B' | long 'A, B, C, D' (40) | short 'B' (100)" in lines
    assert lines[lines.index("long, most frequent picks:") + 1] == "    3 x 'A, B, C, D'"


def test_an_unknown_task_is_refused(picks, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["rerank_picks.py", "no_such_task"])
    with pytest.raises(SystemExit) as stop:
        picks.main()
    assert stop.value.code == 2
    assert "TASK must be a dev" in capsys.readouterr().err
