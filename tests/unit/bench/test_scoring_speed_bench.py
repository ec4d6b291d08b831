"""benchmarks/scoring_speed.py: where its pairs come from, and how rankings are compared."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from bench_pool import choice_task, generation_task, write_pool

from capplug.errors import DataError


@pytest.fixture
def speed() -> ModuleType:
    return importlib.import_module("benchmarks.scoring_speed")


def choice(name: str, count: int, options: int) -> dict:
    return choice_task(
        [f"{name} question {i}" for i in range(count)], [f"o{j}" for j in range(options)]
    )


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return write_pool(
        tmp_path / "data",
        {
            "bigbench/mc_a": ("train", choice("mc_a", 10, 4)),
            "bigbench/mc_b": ("train", choice("mc_b", 10, 3)),
            "bigbench/mc_c": ("train", choice("mc_c", 2, 2)),
            "bigbench/generative": ("train", generation_task([("q", "a")] * 1 + [("r", "b")])),
            "bigbench/winowhy": ("dev", choice("dev", 10, 2)),
        },
    )


def test_pairs_are_whole_option_groups_of_multiple_choice_train_tasks(
    speed: ModuleType, pool: Path
) -> None:
    source, groups = speed.pair_groups(20, seed=0, data=pool)
    assert sum(len(options) for _, options in groups) == 20
    prompts = [prompt for prompt, _ in groups]
    # train multiple-choice tasks only: no dev task, no generative task
    assert not any("dev question" in p or "Q: q" in p for p in prompts)
    # at most GROUPS_PER_TASK examples of a task
    for name in ("mc_a", "mc_b", "mc_c"):
        assert sum(f"{name} question" in p for p in prompts) <= speed.GROUPS_PER_TASK
    # whole groups, each with its own prompt's options; only the last may be cut
    assert all(len(options) == len({*options}) > 0 for _, options in groups)
    assert [len(o) for _, o in groups[:-1]] == [
        {"mc_a": 4, "mc_b": 3, "mc_c": 2}[p.split()[1]] for p in prompts[:-1]
    ]
    used = {p.split()[1] for p in prompts}
    assert source.startswith(f"{len(used)} multiple-choice train tasks of the task pool")
    assert speed.pair_groups(20, seed=0, data=pool) == (source, groups)  # seeded


def test_a_tokenizer_keeps_only_the_options_that_fit(speed: ModuleType, pool: Path) -> None:
    def tokenizer(prompts, options):  # an option of "o0" is too long; the rest fit
        return {"input_ids": [[0] * (99 if o == "o0" else 5) for o in options]}

    _, groups = speed.pair_groups(12, seed=1, data=pool, tokenizer=tokenizer, max_length=10)
    assert groups and all("o0" not in options for _, options in groups)
    assert all(len(options) >= 1 for _, options in groups)


def test_a_pool_without_multiple_choice_train_tasks_is_refused(
    speed: ModuleType, tmp_path: Path
) -> None:
    root = write_pool(tmp_path / "gen", {"bigbench/g": ("train", generation_task([("q", "a")]))})
    with pytest.raises(DataError, match="no multiple-choice train task"):
        speed.pair_groups(10, seed=0, data=root)


def test_top1_agreement_counts_equal_texts_as_one_choice(speed: ModuleType) -> None:
    groups = [("q1", ["yes", "no", "yes "]), ("q2", ["a", "b"])]
    reference = np.array([0.9, 0.1, 0.8, 0.6, 0.5])
    # q1: the other picks the second "yes" (the same text); q2: it picks "b", 0.1 behind "a".
    other = np.array([0.7, 0.1, 0.8, 0.4, 0.5])
    result = speed.top1_agreement(groups, reference, other)
    assert (result["same"], result["groups"]) == (1, 2)
    assert result["flips"] == [{"prompt": "q2", "float32_margin": pytest.approx(0.1)}]
