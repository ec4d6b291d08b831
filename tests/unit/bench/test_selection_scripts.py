"""scripts/draw_candidates.py export and scripts/fit_selector.py on a small task pool: the
prompts come from the pool's train and dev tasks, and the selection is fitted on train tasks
only, grouped by the pool's families."""

from __future__ import annotations

import gzip
import importlib
import json
import sys
from pathlib import Path

import pytest
from bench_pool import choice_task, generation_task, ni_task, write_pool

from capplug.data import open_pool

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
NI_DEV = "natural_instructions_v1/subtask043_essential_terms_answering_incomplete_questions"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("draw_candidates"), importlib.import_module("fit_selector")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture
def pool(tmp_path: Path):
    questions = [f"What is {i} plus 1?" for i in range(30)]
    root = write_pool(
        tmp_path / "data",
        {
            "bigbench/arithmetic/1_digit": (
                "train",
                generation_task([(q, "x") for q in questions]),
            ),
            "bigbench/arithmetic/2_digit": (
                "train",
                generation_task([(q, "y") for q in questions]),
            ),
            "bigbench/anachronisms": ("train", choice_task(questions, ["yes", "no"])),
            "bigbench/tense": ("dev", generation_task([(q, "z") for q in questions])),
            "bigbench/winowhy": ("dev", choice_task(questions, ["right", "wrong"])),
            NI_DEV: ("dev", ni_task("Add one.", [(q, "z") for q in questions])),
        },
    )
    return open_pool(root)


def test_export_writes_train_and_dev_prompts_as_the_benchmarks_choose_them(
    scripts, pool, tmp_path: Path
) -> None:
    draw, _ = scripts
    out = tmp_path / "prompts.jsonl"
    draw.export(out, pool)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_group: dict[str, set[str]] = {}
    for row in rows:
        by_group.setdefault(row["group"], set()).add(row["task"])
    assert by_group == {
        "train-gen": {"bigbench/arithmetic/1_digit", "bigbench/arithmetic/2_digit"},
        "train-mc": {"bigbench/anachronisms"},
        "dev-rerank": {"bigbench/tense", NI_DEV},
        "dev-choice": {"bigbench/winowhy"},
    }
    counts = {g: sum(r["group"] == g for r in rows) for g in by_group}
    assert counts["train-gen"] == 2 * draw.GEN_PER_TASK
    assert counts["train-mc"] == draw.MC_PER_TASK
    assert counts["dev-choice"] == 30  # every example, up to CHOICE_LIMIT
    assert all(r["options"] == ["right", "wrong"] for r in rows if r["group"] == "dev-choice")


def drawn_folder(tmp_path: Path, tasks: list[str]) -> Path:
    """Drawn candidates and their scores for the first two examples of each task."""
    folder = tmp_path / "drawn"
    folder.mkdir()
    rows, scores = [], {}
    for task in tasks:
        for index in range(2):
            texts = ["x", "y", "something"]
            rows.append(
                {
                    "task": task,
                    "index": index,
                    "candidates": [
                        {"text": t, "strategy": "sample", "sum_logprob": -1.0, "n_tokens": 1}
                        for t in texts
                    ],
                }
            )
            scores[f"{task}#{index}"] = [0.5, 0.2, 0.1]
    with gzip.open(folder / "train-gen.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    (folder / "train-gen.scores-capplug-default.json").write_text(json.dumps(scores))
    return folder


def test_sets_are_grouped_by_the_pool_family(scripts, pool, tmp_path: Path) -> None:
    _, fit = scripts
    tasks = ["bigbench/arithmetic/1_digit", "bigbench/arithmetic/2_digit"]
    sets = fit.load_sets(drawn_folder(tmp_path, tasks), "capplug-default", "gen", pool)
    assert [task for task, _ in sets] == [t for t in tasks for _ in range(2)]
    assert {s.group for _, s in sets} == {"arithmetic"}  # one family, not one per source
    assert list(sets[0][1].quality) == [1.0, 0.0, 0.0]  # Rouge-L against the reference "x"


def test_drawn_data_of_a_dev_task_or_an_unknown_task_is_refused(
    scripts, pool, tmp_path: Path
) -> None:
    _, fit = scripts
    folder = drawn_folder(tmp_path, ["bigbench/arithmetic/1_digit", "bigbench/tense"])
    with pytest.raises(SystemExit, match="fitted on train tasks only"):
        fit.load_sets(folder, "capplug-default", "gen", pool)
    with pytest.raises(SystemExit, match="lacks \\(natural_instructions/subtask999\\)"):
        fit.check_train_tasks(pool, {"natural_instructions/subtask999"})
    # a name without its source is enough when only one task has it
    assert fit.check_train_tasks(pool, {"anachronisms"}) == {
        "anachronisms": "bigbench/anachronisms"
    }


def test_pick_takes_a_few_prompts_per_family_from_different_tasks(
    scripts, pool, tmp_path: Path
) -> None:
    draw, _ = scripts
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "picked.jsonl"
    draw.export(prompts, pool)
    assert draw.pick(prompts, out, pool, group="train-gen", per_family=2, leave_out=None) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # arithmetic is one family of two tasks: one prompt of each, not two of one
    assert sorted(r["task"] for r in rows) == [
        "bigbench/arithmetic/1_digit",
        "bigbench/arithmetic/2_digit",
    ]
    again = tmp_path / "again.jsonl"
    draw.pick(prompts, again, pool, group="train-gen", per_family=2, leave_out=None)
    assert again.read_text() == out.read_text()  # seeded: the same subset every time
    draw.pick(prompts, out, pool, group="train-gen", per_family=3, leave_out=None)
    assert len(out.read_text().splitlines()) == 3  # then more examples of the same tasks
