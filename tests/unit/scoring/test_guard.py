"""The guard: an adapted scorer is used only if it picks better on held-out examples."""

from __future__ import annotations

from capplug.data.rows import LabelledPair
from capplug.scoring.guard import guard, pick_quality


class Table:
    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, instruction, responses):
        return [self.table.get(r, 0.0) for r in responses]


HELDOUT = [
    LabelledPair("q1", "right", 1.0, "g1"),
    LabelledPair("q1", "wrong", 0.0, "g1"),
    LabelledPair("q2", "good", 0.8, "g2"),
    LabelledPair("q2", "bad", 0.1, "g2"),
    LabelledPair("q3", "same", 0.5, "g3"),  # labels tie: not compared
    LabelledPair("q3", "alike", 0.5, "g3"),
]
KNOWS = Table({"right": 0.9, "good": 0.9})
GUESSES = Table({"wrong": 0.9, "good": 0.9})


def test_pick_quality_is_the_mean_label_of_the_picks_where_labels_differ():
    assert pick_quality(KNOWS, HELDOUT) == (0.9, 0.9, 2)
    assert pick_quality(GUESSES, HELDOUT) == (0.4, 0.9, 2)


def test_a_scorer_that_picks_better_is_used_and_one_that_does_not_is_not():
    better = guard(GUESSES, KNOWS, HELDOUT)
    assert better.use and better.examples == 2 and "picks better" in better.reason
    worse = guard(KNOWS, GUESSES, HELDOUT)
    assert not worse.use and "picks worse" in worse.reason
    same = guard(KNOWS, KNOWS, HELDOUT)
    assert not same.use and "no better" in same.reason


def test_nothing_to_compare_on_keeps_the_starting_scorer():
    report = guard(GUESSES, KNOWS, HELDOUT[4:])
    assert not report.use and report.examples == 0 and "nothing to compare" in report.reason
