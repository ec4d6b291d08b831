"""benchmarks/zero_shot_choice.py on a small task pool and a tiny random scorer: it runs on the
pool's dev tasks, and its report says which tasks of the original list are left out."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_pool import choice_task, generation_task, write_pool

from capplug.testing import save_tiny_scorer


@pytest.fixture
def bench() -> ModuleType:
    return importlib.import_module("benchmarks.zero_shot_choice")


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    questions = [f"Is the {i}th thing here?" for i in range(8)]
    return write_pool(
        tmp_path / "data",
        {
            "bigbench/winowhy": ("dev", choice_task(questions, ["correct", "incorrect"])),
            "bigbench/sports_understanding": (
                "dev",
                choice_task(questions, ["yes", "no", "maybe"]),
            ),
            "bigbench/anachronisms": ("train", choice_task(questions, ["yes", "no"])),
        },
    )


def test_a_run_reports_the_pool_dev_tasks_and_what_the_list_lost(
    bench: ModuleType, pool: Path, tmp_path: Path
) -> None:
    scorer = str(save_tiny_scorer(tmp_path / "scorer"))
    out = tmp_path / "results"
    argv = ["--data", str(pool), "--scorer", scorer, "--methods", "scorer", "--limit", "5"]
    result = bench.main([*argv, "--results", str(out)])

    assert list(result["tasks"]) == ["bigbench/sports_understanding", "bigbench/winowhy"]
    assert all(row["examples"] == 5 for row in result["tasks"].values())
    assert result["tasks"]["bigbench/winowhy"]["chance"] == pytest.approx(0.5)
    assert 0.0 <= result["mean"]["scorer"] <= 1.0
    report = (out / "zero_shot_choice.md").read_text()
    assert (
        "dev.zero_shot_choice: 2 of the 9 tasks of the original BIG-bench list are in the task "
        "pool; 7 could not be recovered and are left out (analytic_entailment, entailed_polarity, "
        "presuppositions_as_nli, causal_judgment, crass_ai, metaphor_boolean, "
        "irony_identification), so its figures are over 2 tasks and do not compare with reports "
        "on all 9."
    ) in report
    assert json.loads((out / "zero_shot_choice.json").read_text())["mean"] == result["mean"]

    # A rerun reads every score from the cache; a cached result for other data is recomputed.
    again = bench.main([*argv, "--results", str(out), "--tasks", "winowhy"])
    assert again["seconds"] == {} and list(again["tasks"]) == ["bigbench/winowhy"]
    assert (
        "This run covers 1 of the 2 (bigbench/winowhy)."
        in (out / "zero_shot_choice.md").read_text()
    )
    # the same task names in other data, with fewer examples: its scores are computed anew
    other = write_pool(
        tmp_path / "other",
        {"bigbench/winowhy": ("dev", choice_task(["One?", "Two?", "Three?"], ["a", "b"]))},
    )
    fewer = bench.main([*argv[2:], "--data", str(other), "--results", str(out)])
    assert fewer["tasks"]["bigbench/winowhy"]["examples"] == 3 and "scorer" in fewer["seconds"]


def test_a_task_without_options_is_left_out_with_the_reason(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    root = write_pool(
        tmp_path / "data",
        {
            # no task of the list is dev here, so the pool's own dev tasks stand in for it
            "bigbench/my_choice": ("dev", choice_task(["a?", "b?"], ["yes", "no"])),
            "bigbench/my_generation": ("dev", generation_task([("a?", "yes")])),
        },
    )
    scorer = str(save_tiny_scorer(tmp_path / "scorer"))
    argv = ["--data", str(root), "--scorer", scorer, "--methods", "scorer"]
    result = bench.main([*argv, "--results", str(tmp_path / "out")])
    assert list(result["tasks"]) == ["bigbench/my_choice"]
    lines = bench.report_lines(result)
    assert (
        "Left out bigbench/my_generation: no example has options (target_scores) to choose from."
        in lines
    )
    assert any("The pool's own dev tasks stand in for the list" in line for line in lines)


def test_tasks_outside_the_dev_list_are_refused(bench: ModuleType, pool: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(["--data", str(pool), "--tasks", "anachronisms"])
    assert stop.value.code == 2
    assert "--tasks must be dev.zero_shot_choice tasks" in capsys.readouterr().err


def test_a_train_fold_run_covers_that_fold_only_and_leaves_the_dev_results_alone(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    questions = [f"Is the {i}th thing here?" for i in range(6)]
    tasks = {
        f"bigbench/choice_{i}": ("train", choice_task(questions, ["yes", "no"])) for i in range(4)
    }
    tasks["bigbench/words"] = ("train", generation_task([("a?", "yes")]))
    tasks["bigbench/winowhy"] = ("dev", choice_task(questions, ["yes", "no"]))
    root = write_pool(tmp_path / "data", tasks)
    scorer = str(save_tiny_scorer(tmp_path / "scorer"))
    dev_results, out = tmp_path / "dev", tmp_path / "fold"
    argv = ["--data", str(root), "--scorer", scorer, "--methods", "scorer", "--limit", "4"]

    from capplug.data import open_pool

    folds = open_pool(root).folds(2)
    fold = next(i for i, names in enumerate(folds) if "bigbench/words" in names)
    fold_args = ["--split", "train", "--folds", "2", "--fold", str(fold), "--out", str(out)]
    result = bench.main([*argv, *fold_args, "--results", str(dev_results)])

    assert set(result["tasks"]) == set(folds[fold]) - {"bigbench/words"}
    assert result["skipped"] == {
        "bigbench/words": "no example has options (target_scores) to choose from"
    }
    assert not dev_results.exists()
    report = (out / "zero_shot_choice.md").read_text()
    assert report.startswith(f"Train fold {fold} of 2 (families never split across folds)")
    assert "1 task of the fold has none and is left out" in report
    assert (
        "Mean over the " in report and "families (each weighs the same): capplug scorer" in report
    )
    assert "- capplug scorer: " in report and " points against chance, interval " in report
    # every example's hit is kept, so the intervals can be recomputed from the JSON
    row = next(iter(result["tasks"].values()))
    assert len(row["per_example"]["scorer"]) == 4


def test_a_train_fold_run_needs_its_fold_and_folder(bench: ModuleType, pool: Path, capsys) -> None:
    for extra in (["--split", "train", "--fold", "0"], ["--fold", "0"], ["--split", "train"]):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--data", str(pool), *extra])
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--split train needs --fold and --out" in err
    assert "--fold and --out are for --split train" in err
