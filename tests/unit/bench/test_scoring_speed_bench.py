"""benchmarks/scoring_speed.py: where its pairs come from, and how rankings are compared."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest

from capplug.errors import PackageFetchError


@pytest.fixture
def speed() -> ModuleType:
    return importlib.import_module("benchmarks.scoring_speed")


def test_without_bigbench_the_generated_groups_are_used_whole(
    speed: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise PackageFetchError("bigbench==1.0.0 is not on the registry")

    generated = [
        {"instruction": f"q{i}", "responses": [f"a{i}-{j}" for j in range(4)]} for i in range(10)
    ]
    monkeypatch.setattr("capplug.data.bigbench.task_names", unavailable)
    monkeypatch.setattr("benchmarks.generated_pairs.generated_pairs", lambda: generated)
    source, groups = speed.pair_groups(10, seed=0)
    assert source == speed.GENERATED_SOURCE
    assert sum(len(r) for _, r in groups) == 10
    # Whole groups, each response with its own instruction; only the last group is cut.
    assert [len(r) for _, r in groups] == [4, 4, 2]
    assert all(r.startswith(f"a{p[1:]}-") for p, rs in groups for r in rs)
    assert speed.pair_groups(10, seed=0) == (source, groups)  # seeded


def test_top1_agreement_counts_equal_texts_as_one_choice(speed: ModuleType) -> None:
    groups = [("q1", ["yes", "no", "yes "]), ("q2", ["a", "b"])]
    reference = np.array([0.9, 0.1, 0.8, 0.6, 0.5])
    # q1: the other picks the second "yes" (the same text); q2: it picks "b", 0.1 behind "a".
    other = np.array([0.7, 0.1, 0.8, 0.4, 0.5])
    result = speed.top1_agreement(groups, reference, other)
    assert (result["same"], result["groups"]) == (1, 2)
    assert result["flips"] == [{"prompt": "q2", "float32_margin": pytest.approx(0.1)}]
