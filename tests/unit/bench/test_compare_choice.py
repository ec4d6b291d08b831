"""benchmarks/compare_choice.py: two zero-shot choice results compared example by example."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def bench() -> ModuleType:
    return importlib.import_module("benchmarks.compare_choice")


def _result(hits: dict[str, list[float]], family: dict[str, str]) -> dict:
    tasks = {
        task: {
            "examples": len(h),
            "family": family[task],
            "chance": 0.5,
            "scorer": sum(h) / len(h),
            "per_example": {"chance": [0.5] * len(h), "scorer": h},
        }
        for task, h in hits.items()
    }
    return {"benchmark": "zero_shot_choice", "tasks": tasks}


def test_the_difference_comes_with_a_paired_interval_and_family_means(
    bench: ModuleType, tmp_path: Path, capsys
) -> None:
    family = {"a/1": "a", "a/2": "a", "b/1": "b"}
    before = _result({"a/1": [0.0] * 20, "a/2": [0.0] * 20, "b/1": [1.0] * 20}, family)
    after = _result({"a/1": [1.0] * 20, "a/2": [1.0] * 10 + [0.0] * 10, "b/1": [1.0] * 20}, family)
    paths = []
    for name, result in (("before", before), ("after", after)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))

    out = bench.main([str(p) for p in paths])["columns"]["scorer"]

    assert out["before"] == pytest.approx(100 / 3) and out["after"] == pytest.approx(250 / 3)
    # by family, a's two tasks count once: before (0 + 1) / 2, after (0.75 + 1) / 2
    assert out["before_by_family"] == pytest.approx(50.0)
    assert out["after_by_family"] == pytest.approx(87.5)
    lo, hi = out["interval"]
    assert 0 < lo <= 50.0 <= hi
    assert (out["tasks_better"], out["tasks_worse"]) == (2, 0)
    assert "| capplug scorer | 33.3 | 83.3 | +50.0 |" in capsys.readouterr().out


def test_results_on_other_examples_are_refused(bench: ModuleType, tmp_path: Path, capsys) -> None:
    before = _result({"a/1": [0.0] * 4}, {"a/1": "a"})
    after = _result({"a/1": [1.0] * 4}, {"a/1": "a"})
    after["tasks"]["a/1"]["per_example"]["chance"] = [0.25] * 4
    (tmp_path / "b.json").write_text(json.dumps(before))
    (tmp_path / "a.json").write_text(json.dumps(after))
    with pytest.raises(SystemExit) as stop:
        bench.main([str(tmp_path / "b.json"), str(tmp_path / "a.json")])
    assert stop.value.code == 2
    assert "a/1: the two results were not run on the same examples" in capsys.readouterr().err
