"""benchmarks/compare_rerank.py: two rerank results side by side, only on the same candidates."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def compare() -> ModuleType:
    return importlib.import_module("benchmarks.compare_rerank")


def task_row(adapted: list[float], oracle: list[float] | None = None) -> dict:
    per_example = {
        "beam": [10.0, 30.0] * 5,
        "lm-sum": [10.0, 30.0] * 5,
        "lm-mean": [10.0, 30.0] * 5,
        "scorer": [20.0] * 10,
        "adapted": adapted,
        "oracle": oracle or [50.0] * 10,
    }
    row = {name: sum(v) / len(v) for name, v in per_example.items()}
    return row | {"examples": 10, "per_example": per_example}


def result(**tasks: dict) -> dict:
    return {"benchmark": "rerank_generation", "tasks": tasks}


def test_a_steady_gain_is_reported_with_its_interval_and_the_gap_closed(compare) -> None:
    before = result(t1=task_row([20.0] * 10), t2=task_row([30.0] * 10))
    after = result(t1=task_row([25.0] * 10), t2=task_row([30.0, 40.0] * 5))
    lines = compare.compare(before, after, names=("old", "new"))
    assert "| t1 | 20.0 | 20.0 | 20.0 | 25.0 | 50.0 |" in lines
    assert "| **mean** | **20.0** | **20.0** | **25.0** | **30.0** | **50.0** |" in lines
    summary = next(line for line in lines if line.startswith("new - old"))
    # t1 gains 5 on every example; t2 gains 0 or 10: the mean gain is 5, never below 2.5
    assert summary.startswith("new - old: +5.00 points over 2 tasks (better on 2, worse on 0)")
    lo = float(summary.split("95% interval ")[1].split(" to ")[0])
    assert 2.5 <= lo < 5
    assert "Gap to the oracle closed: 17% (old) -> 33% (new)." in lines


def test_runs_on_different_candidates_are_refused_by_task(compare) -> None:
    before = result(t1=task_row([20.0] * 10))
    after = result(t1=task_row([20.0] * 10, oracle=[50.0] * 9 + [60.0]))
    with pytest.raises(compare.ComparisonError, match="t1: the runs saw different candidates"):
        compare.compare(before, after)


def test_results_without_per_example_scores_or_a_shared_task_are_refused(compare) -> None:
    old = result(t1={k: v for k, v in task_row([20.0] * 10).items() if k != "per_example"})
    with pytest.raises(compare.ComparisonError, match="no per-example scores"):
        compare.compare(old, result(t1=task_row([20.0] * 10)))
    with pytest.raises(compare.ComparisonError, match="share no task"):
        compare.compare(result(t1=task_row([20.0] * 10)), result(t2=task_row([20.0] * 10)))
    with pytest.raises(compare.ComparisonError, match="not in both results: t9"):
        compare.compare(
            result(t1=task_row([20.0] * 10)), result(t1=task_row([20.0] * 10)), tasks=["t9"]
        )


def test_the_command_line_names_a_bad_file_and_exits_2(
    compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(result(t1=task_row([20.0] * 10))))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setattr(sys, "argv", ["compare_rerank.py", str(good), str(bad)])
    with pytest.raises(SystemExit) as stop:
        compare.main()
    assert stop.value.code == 2
    assert "bad.json: not a readable results JSON" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["compare_rerank.py", str(good), str(good)])
    compare.main()
    assert (
        "after - before: +0.00 points over 1 task (better on 0, worse on 0)"
        in capsys.readouterr().out
    )
