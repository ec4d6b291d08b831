"""benchmarks/rerank_picks.py: each scorer's pick per instruction, and its most frequent picks."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
from bench_pool import generation_task, write_pool

from capplug.data import Example


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
    test = [Example("t", i, "q", "Q: q\nA: ", [ref]) for i, ref in enumerate("CCB")]
    lines = picks.picks_report("t", {"long": Longest(), "short": Shortest()}, Cache(), test, 20)
    assert lines[0] == "t: 3 test instructions"
    # the list of every letter gets partial credit against a one-letter reference
    assert "reference 'C' | long 'A, B, C, D' (40) | short 'B' (0)" in lines
    assert "reference 'B' | long 'A, B, C, D' (40) | short 'B' (100)" in lines
    assert lines[lines.index("long, most frequent picks:") + 1] == "    3 x 'A, B, C, D'"


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    pairs = [(f"q{i}", f"a{i}") for i in range(20)]
    return write_pool(
        tmp_path / "data",
        {
            "bigbench/tense": ("dev", generation_task(pairs)),
            "bigbench/anachronisms": ("train", generation_task(pairs)),
        },
    )


def test_an_unknown_or_train_task_is_refused(picks, pool: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        picks.main(["no_such_task", "--data", str(pool)])
    assert stop.value.code == 2
    assert "no task 'no_such_task'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        picks.main(["anachronisms", "--data", str(pool)])
    assert stop.value.code == 2
    assert "TASK must be a dev" in capsys.readouterr().err


def test_without_cached_candidates_it_says_what_to_run(picks, pool: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        picks.main(["tense", "--data", str(pool), "--limit", "3", "--adapt-examples", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "instructions have no cached candidates" in err
    assert f"benchmarks.rerank_generation --data {pool} --tasks bigbench/tense --limit 3" in err
