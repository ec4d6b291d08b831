"""benchmarks/_tasks.py: the benchmarks' dev lists from the task pool, and what their reports say
when a list is shorter than the original BIG-bench list."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from bench_pool import choice_task, generation_task, write_pool
from benchmarks import _tasks

from capplug.data import open_pool
from capplug.errors import DataError

QUESTIONS = [f"Is {i} even?" for i in range(6)]


@pytest.fixture
def pool(tmp_path: Path):
    root = write_pool(
        tmp_path / "data",
        {
            "bigbench/winowhy": ("dev", choice_task(QUESTIONS, ["yes", "no"])),
            "bigbench/causal_judgment": ("dev", choice_task(QUESTIONS, ["yes", "no"])),
            "bigbench/tense": ("dev", generation_task([("ran", "run")])),
            "bigbench/anachronisms": ("train", choice_task(QUESTIONS, ["yes", "no"])),
        },
    )
    return open_pool(root)


def test_a_shrunk_dev_list_names_what_is_left_out(pool) -> None:
    info = _tasks.dev_list(pool, "zero_shot_choice")
    assert info["tasks"] == ["bigbench/causal_judgment", "bigbench/winowhy"]
    assert info["original"] == 9 and len(info["missing"]) == 7
    assert "analytic_entailment" in info["missing"] and "winowhy" not in info["missing"]
    (line,) = _tasks.dev_list_lines([info], info["tasks"])
    assert line.startswith(
        "dev.zero_shot_choice: 2 of the 9 tasks of the original BIG-bench list are in the task "
        "pool; 7 could not be recovered and are left out (analytic_entailment, "
    )
    assert "figures are over 2 tasks and do not compare with reports on all 9" in line
    # a run on part of the list says so too
    (part,) = _tasks.dev_list_lines([info], ["bigbench/winowhy"])
    assert part.endswith("This run covers 1 of the 2 (bigbench/winowhy).")
    # a run on none of the list's tasks (another dev group) says nothing of it
    assert _tasks.dev_list_lines([info], ["bigbench/tense"]) == []


def test_natural_instructions_names_are_matched_across_sources() -> None:
    assert _tasks._bare("natural_instructions/subtask043_x") == "subtask043_x"
    assert _tasks._bare("natural_instructions_v1/subtask043_x") == "subtask043_x"
    assert _tasks._bare("bigbench/gem/common_gen") == "gem/common_gen"
    assert _tasks._bare("gem/common_gen") == "gem/common_gen"


def test_one_task_left_out_reads_as_one(pool) -> None:
    info = {**_tasks.dev_list(pool, "zero_shot_choice"), "missing": ["crass_ai"]}
    (line,) = _tasks.dev_list_lines([info], info["tasks"])
    assert "1 could not be recovered and is left out (crass_ai)" in line


def test_a_whole_list_adds_no_line() -> None:
    info = {
        "benchmark": "rerank_generation",
        "tasks": ["bigbench/tense"],
        "original": 1,
        "kept": ["tense"],
        "missing": [],
    }
    assert _tasks.dev_list_lines([info], ["bigbench/tense"]) == []


def test_a_pool_without_dev_tasks_is_refused_with_the_reason(tmp_path: Path) -> None:
    root = write_pool(
        tmp_path / "train-only", {"bigbench/anachronisms": ("train", {"examples": []})}
    )
    with pytest.raises(DataError, match=r"no dev tasks for dev\.zero_shot_choice"):
        _tasks.dev_tasks(open_pool(root), "zero_shot_choice")


def test_tasks_are_resolved_by_their_short_name_and_checked(pool, capsys) -> None:
    parser = argparse.ArgumentParser()
    allowed = _tasks.dev_tasks(pool, "zero_shot_choice")
    assert _tasks.resolve_tasks(parser, pool, ["winowhy"], allowed, "dev.x") == ["bigbench/winowhy"]
    assert _tasks.resolve_tasks(parser, pool, None, allowed, "dev.x") is None
    with pytest.raises(SystemExit):
        _tasks.resolve_tasks(parser, pool, ["anachronisms"], allowed, "dev.x")
    assert "--tasks must be dev.x tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _tasks.resolve_tasks(parser, pool, ["no_such_task"], allowed, "dev.x")
    assert "no task 'no_such_task'" in capsys.readouterr().err


def test_no_data_is_a_usage_error_that_says_where_to_look(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(data=str(tmp_path / "nowhere"), strict=False)
    with pytest.raises(SystemExit):
        _tasks.open_data(args, parser)
    assert "no task data at" in capsys.readouterr().err
