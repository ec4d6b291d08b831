"""Cappy's weak labels: gold, negatives, options and Rouge-L-scored candidates."""

from __future__ import annotations

import json

import pytest

from capplug.data import Task, parse_task
from capplug.data.labels import (
    LabelledRow,
    clipped_variants,
    label_candidates,
    label_clipped,
    normalised_option_scores,
    reference_rows,
    rouge_l,
)


def _task(name: str, examples: list[dict]) -> Task:
    return parse_task(name, {"examples": examples})


def _generative() -> Task:
    return _task(
        "qa_wikidata",
        [
            {"input": "The capital of France is", "target": ["Paris", "City of Light"]},
            {"input": "The capital of Spain is", "target": "Madrid"},
            {"input": "The capital of Italy is", "target": "Rome"},
            {"input": "The capital of Italy is", "target": "rome "},  # same input, other form
            {"input": "The capital of Peru is", "target": "Paris"},  # collides with example 0
        ],
    )


def test_rouge_l_uses_stemming_and_takes_the_best_reference() -> None:
    assert rouge_l("the cats are running", ["the cat is run"]) == pytest.approx(0.75)
    assert rouge_l("Paris", ["Rome", "paris"]) == 1.0
    assert rouge_l("", ["Paris"]) == 0.0
    assert rouge_l("Paris", "Paris") == 1.0
    with pytest.raises(ValueError, match="references must hold"):
        rouge_l("x", [])


def test_gold_rows_label_every_reference_one() -> None:
    rows = list(reference_rows(_generative(), seed=0))
    gold = [(r.example_id, r.response) for r in rows if r.source == "gold"]
    assert gold == [
        (0, "Paris"),
        (0, "City of Light"),
        (1, "Madrid"),
        (2, "Rome"),
        (3, "rome "),
        (4, "Paris"),
    ]
    assert all(r.label == 1.0 for r in rows if r.source == "gold")
    assert all(
        r.instruction == "\nQ: The capital of France is\nA: " for r in rows if r.example_id == 0
    )


def test_negatives_are_other_examples_references_never_own() -> None:
    task = _generative()
    for seed in range(20):
        rows = list(reference_rows(task, seed=seed))
        by_example: dict[int, list[LabelledRow]] = {}
        for row in rows:
            by_example.setdefault(row.example_id, []).append(row)
        for example in task.examples:
            own = {t.strip().casefold() for t in example.targets}
            negatives = [r for r in by_example[example.index] if r.source == "negative"]
            positives = [r for r in by_example[example.index] if r.source == "gold"]
            assert len(negatives) == len(positives)
            assert all(r.label == 0.0 for r in negatives)
            for row in negatives:
                assert row.response.strip().casefold() not in own
                donors = [e for e in task.examples if row.response in e.targets]
                assert donors and all(d.input != example.input for d in donors)
            # Example 2 and 3 share an input: Rome must never be a negative for either.
            if example.index in (2, 3):
                assert all(r.response.strip().casefold() != "rome" for r in negatives)


def test_negatives_are_deterministic_given_the_seed() -> None:
    task = _generative()
    assert list(reference_rows(task, seed=3)) == list(reference_rows(task, seed=3))
    picks = {
        tuple(r.response for r in reference_rows(task, seed=s) if r.source == "negative")
        for s in range(10)
    }
    assert len(picks) > 1


def test_option_scores_are_min_max_normalised() -> None:
    assert normalised_option_scores({"a": 2, "b": 4, "c": 3}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert normalised_option_scores({"only": 0}) == {"only": 0.0}
    task = _task(
        "anachronisms",
        [
            {"input": "q1", "target_scores": {"good": 5, "bad": 1, "meh": 3}},
            {"input": "q2", "target_scores": {"good": 1, "bad": 5, "meh": 3}},
        ],
    )
    rows = list(reference_rows(task, seed=0))
    options = {(r.example_id, r.response): r.label for r in rows if r.source == "option"}
    # The top option is the gold reference; it is not repeated as an option row.
    assert options == {(0, "bad"): 0.0, (0, "meh"): 0.5, (1, "good"): 0.0, (1, "meh"): 0.5}
    gold = {(r.example_id, r.response) for r in rows if r.source == "gold"}
    assert gold == {(0, "good"), (1, "bad")}
    # Each example's only usable negative is the other example's reference.
    negatives = [(r.example_id, r.response) for r in rows if r.source == "negative"]
    assert negatives == [(0, "bad"), (1, "good")]


def test_no_negative_when_every_reference_is_forbidden() -> None:
    task = _task("tense", [{"input": "a", "target": "same"}, {"input": "b", "target": "Same"}])
    rows = list(reference_rows(task, seed=0))
    assert [r.source for r in rows] == ["gold", "gold"]
    assert list(reference_rows(task, seed=0, negatives=False)) == rows


def test_rows_of_several_tasks_are_refused() -> None:
    a, b = _generative().examples[0], _task("tense", [{"input": "x", "target": "y"}]).examples[0]
    with pytest.raises(ValueError, match="one task"):
        list(reference_rows([a, b]))


def test_candidates_are_deduplicated_and_scored_by_rouge() -> None:
    example = _generative().examples[0]
    rows = label_candidates(
        example,
        ["Paris", " Paris ", ("It is Paris", {"temperature": 0.9, "top_k": 40}), "Lyon"],
        generator="smollm2|beam=4",
    )
    assert [r.response for r in rows] == ["Paris", "It is Paris", "Lyon"]
    assert [r.label for r in rows] == pytest.approx([1.0, 0.5, 0.0])
    assert {r.source for r in rows} == {"sampled"}
    assert rows[0].generator == "smollm2|beam=4"
    assert json.loads(rows[1].generator) == {"temperature": 0.9, "top_k": 40}
    assert rows[0].to_dict()["example_id"] == 0


def test_candidates_reject_bad_items() -> None:
    example = _generative().examples[0]
    with pytest.raises(TypeError, match=r"candidates\[1\]"):
        label_candidates(example, ["ok", 3])  # type: ignore[list-item]


def test_clipped_variants_are_the_first_line_and_first_sentence() -> None:
    assert clipped_variants("Paris.\n\nIt is also known as the City of Light.") == [
        ("first_line", "Paris."),
    ]
    assert clipped_variants("  Paris. It is big!\nMore. ") == [
        ("first_line", "Paris. It is big!"),
        ("first_sentence", "Paris."),
    ]
    # a closing quote stays with its sentence; decimals and one-sentence answers are not cut
    assert clipped_variants('He said "no." Then left.') == [("first_sentence", 'He said "no."')]
    assert clipped_variants("It costs 3.5 euros.") == []
    assert clipped_variants("Paris") == []
    assert clipped_variants(" \n ") == []


def test_clipped_rows_are_labelled_against_the_references_and_not_repeated() -> None:
    example = _generative().examples[1]  # Madrid
    rows = label_candidates(
        example,
        [
            ("Madrid. Spain's capital has been Madrid since 1561, when the court moved.", "beam4"),
            ("Madrid.\nSome say Toledo.", "topk40"),  # its first line repeats the beam's clip
            ("Madrid.", "sample"),
        ],
    )
    # every clip would be "Madrid.", which is already a sampled candidate: nothing repeats it
    assert label_clipped(rows, example.targets) == []
    long_only = label_candidates(example, [("Madrid. It moved there in 1561 with the court.", "s")])
    (short,) = label_clipped(long_only, example.targets)
    assert short.source == "clipped" and short.generator == "s+first_sentence"
    assert short.response == "Madrid." and short.label == pytest.approx(1.0)
    assert long_only[0].label < 0.5  # the short answer is the better one, and labelled so
    assert label_clipped(reference_rows([example]), example.targets) == []  # only sampled rows clip
