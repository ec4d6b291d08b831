"""The selection core: signals, their combiner, validation, and the metadata schema."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

import capplug.selection.agreement as agreement
from capplug.llms.collect import Collected
from capplug.selection import (
    METADATA_KEYS,
    TOOL_CALLS_UNSCORED,
    Combiner,
    Reranker,
    Selection,
    distinct,
    echo,
    fit_weights,
    rouge_agreement,
    rouge_l_f,
    signal_values,
    tool_call_order,
    unscored_metadata,
)


class FakeScorer:
    """Scores each response by a table; records every call."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def score(self, instruction, responses):
        self.calls.append(list(responses))
        return [self.table.get(r, 0.5) for r in responses]


def combiner(**weights: float) -> Combiner:
    return Combiner({"+".join(sorted(weights)): weights})


def reranker(table: dict[str, float], **weights: float) -> tuple[Reranker, FakeScorer]:
    scorer = FakeScorer(table)
    return Reranker(scorer, combiner=combiner(**weights)), scorer


# ------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("a b c d e", "e d c b a"),
        ("Canberra is the capital.", "The capital is Canberra"),
        ("one", "two three"),
    ],
)
def test_rouge_l_f_matches_rouge_score_without_stemming(a, b):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure
    assert rouge_l_f(a, b) == pytest.approx(expected)


def test_agreement_counts_repeats_and_favours_the_majority():
    texts = ["Paris.", "Paris.", "Lyon.", "Paris is the capital."]
    agree = rouge_agreement(texts)
    assert agree[0] == agree[1] > agree[3] > agree[2]
    # "Paris." agrees fully with its repeat, not at all with "Lyon.", 2/4 with the long one.
    assert agree[0] == pytest.approx((1 + 0 + 2 * 1 / 5) / 3)


def test_agreement_of_one_text_is_zero_and_of_cjk_text_is_per_character():
    assert rouge_agreement(["only"]).tolist() == [0.0]
    assert rouge_l_f("北京是首都", "首都是北京") > 0


def test_echo_is_the_share_of_a_candidate_that_repeats_the_instruction():
    prompt = "Translate to French: Good morning, my friend."
    values = echo(prompt, ["Good morning, my friend.", "Bonjour, mon ami.", "Good day", ""])
    assert values.tolist() == [1.0, 0.0, 0.5, 0.0]


def test_the_choice_follows_echo_and_only_signals_with_weights_are_computed():
    prompt = "Rewrite in the past tense: I walk home."
    texts = ["I walked home.", "She sings."]
    ranker = Reranker(None, combiner=combiner(echo=1.0))
    assert ranker.signals == ("echo",)
    assert ranker.select(prompt, texts).index == 0
    assert Reranker(None, combiner=combiner(echo=-1.0)).select(prompt, texts).index == 1
    assert set(ranker.select(prompt, texts).signals) == {"echo"}


# ------------------------------------------------------------------------------- the choice


def test_the_choice_follows_the_scorer():
    ranker, _ = reranker({"Canberra.": 0.9, "Sydney.": 0.2}, scorer=1.0)
    assert ranker.select("Capital of Australia?", ["Sydney.", "Canberra."]).index == 1
    ranker, _ = reranker({"Canberra.": 0.1, "Sydney.": 0.2}, scorer=1.0)
    assert ranker.select("Capital of Australia?", ["Sydney.", "Canberra."]).index == 0


def test_the_choice_follows_agreement():
    ranker, _ = reranker({}, agreement=1.0, scorer=0.1)
    texts = ["32", "42", "42", "The answer is 42", "I cannot say"]
    assert ranker.select("What is 12 plus 30?", texts).response == "42"
    texts = ["32", "32", "42", "The answer is 32"]
    assert ranker.select("What is 12 plus 30?", texts).response == "32"


def test_the_choice_follows_logprobs_and_falls_back_without_them():
    scorer = FakeScorer({"a": 0.9, "b": 0.1})
    both = Combiner(
        {
            "logprob+scorer": {"logprob": 2.0, "scorer": 1.0},
            "scorer": {"scorer": 1.0},
        }
    )
    ranker = Reranker(scorer, combiner=both, signals=("scorer", "logprob"))
    assert ranker.select("q", ["a", "b"], logprobs=[-9.0, -1.0]).index == 1
    assert ranker.select("q", ["a", "b"], logprobs=[-1.0, -9.0]).index == 0
    plain = ranker.select("q", ["a", "b"])
    assert plain.index == 0 and plain.weights == {"scorer": 1.0}
    assert "logprob" not in plain.signals


def test_the_choice_follows_the_mean_logprob_when_token_counts_are_given():
    ranker = Reranker(None, combiner=combiner(logprob_mean=1.0, logprob=0.0), signals=None)
    lp = [-4.0, -6.0]
    assert ranker.select("q", ["x", "y"], logprobs=lp, token_counts=[2, 6]).index == 1
    assert ranker.select("q", ["x", "y"], logprobs=lp, token_counts=[8, 6]).index == 0


def test_repeats_are_scored_once_and_the_index_is_into_the_callers_list():
    ranker, scorer = reranker({"good": 0.9, "bad": 0.1}, scorer=1.0)
    selection = ranker.select("q", ["bad", "good", "bad", "good"])
    assert scorer.calls == [["bad", "good"]]
    assert selection.index == 1 and selection.response == "good"
    assert [c.index for c in selection.candidates] == [0, 1, 2, 3]


def test_one_candidate_is_returned_without_scoring():
    ranker, scorer = reranker({}, scorer=1.0)
    selection = ranker.select("q", ["only answer"])
    assert (selection.index, selection.response, selection.score) == (0, "only answer", 1.0)
    assert scorer.calls == []


def test_empty_strings_are_scored_like_any_candidate():
    ranker, _ = reranker({"": 0.8, "x": 0.3}, scorer=1.0)
    assert ranker.select("q", ["x", ""]).index == 1


def test_scores_are_probabilities_and_rank_is_best_first():
    ranker, _ = reranker({"a": 0.2, "b": 0.9, "c": 0.5}, scorer=1.0)
    selection = ranker.select("q", ["a", "b", "c"])
    assert sum(c.score for c in selection.candidates) == pytest.approx(1.0)
    assert [c.index for c in ranker.rank("q", ["a", "b", "c"])] == [1, 2, 0]
    assert [c.index for c in ranker.rank("q", ["a", "b", "c"], top_k=1)] == [1]


def test_metadata_is_one_json_schema():
    ranker, _ = reranker({"a": 0.2, "b": 0.9}, scorer=1.0, agreement=0.5)
    meta = ranker.select("q", ["a", "b"], logprobs=[-1.0, -2.0]).metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["chosen"] == 1 and meta["candidates"] == ["a", "b"]
    assert meta["signals"]["scorer"] == [0.2, 0.9]
    assert set(meta["weights"]) == {"scorer", "agreement"}
    # Collecting's keys and choosing's keys make the schema every surface reports; a choice
    # made without scores reports the same keys.
    collected = set(Collected().metadata(2))
    assert collected | set(meta) == set(METADATA_KEYS) and not collected & set(meta)
    unscored = unscored_metadata(["a", "b"], [1, 0], TOOL_CALLS_UNSCORED)
    assert set(unscored) == set(meta) and unscored["chosen"] == 1 and unscored["scores"] is None


def test_distinct_keeps_the_first_of_each_repeat_and_maps_every_text_to_it():
    assert distinct(["a", "b", " a ", "c", "b"]) == (["a", "b", "c"], [0, 1, 0, 2, 1])


def test_agreement_counts_repeats_up_to_whitespace_as_repeats():
    assert (
        rouge_agreement(["a b", " a  b", "c"]).tolist()
        == rouge_agreement(["a b", "a b", "c"]).tolist()
    )


def test_the_async_path_chooses_as_the_sync_one_does():
    ranker, scorer = reranker({"good": 0.9, "bad": 0.1}, scorer=1.0, agreement=0.5)
    texts = ["bad", "good", "good "]
    awaited = asyncio.run(ranker.selector().aselect("q", texts))
    assert awaited == ranker.select("q", texts)
    assert scorer.calls == [["bad", "good"]] * 2  # repeats scored once, either way


def test_a_feedback_store_that_fails_is_logged_and_the_choice_goes_out(caplog):
    class Failing:
        def record(self, *args, **kwargs):
            raise OSError("disk full")

        def add(self, *args, **kwargs):
            raise AssertionError("not judged here")

    scorer = FakeScorer({"good": 0.9})
    ranker = Reranker(scorer, combiner=combiner(scorer=1.0), feedback=Failing())
    with caplog.at_level(logging.ERROR, logger="capplug.selection"):
        chosen = ranker.select("q", ["bad", "good"])
    assert chosen.index == 1 and chosen.id is None
    assert "could not record the selection" in caplog.text and "disk full" in caplog.text


def test_an_unscored_choice_is_one_selection_too():
    chosen = Selection.unscored(["a", "b", "c"], [2, 0, 1], TOOL_CALLS_UNSCORED)
    assert (chosen.index, chosen.response, chosen.scored) == (2, "c", False)
    assert chosen.order() == [2, 0, 1] and [c.index for c in chosen.ranking()] == [2, 0, 1]
    assert chosen.metadata() == unscored_metadata(["a", "b", "c"], [2, 0, 1], TOOL_CALLS_UNSCORED)


def test_candidates_go_back_chosen_first_then_distinct_answers_best_first_then_repeats():
    ranker, _ = reranker({"x": 0.9, "y": 0.5, "z": 0.1}, scorer=1.0)
    chosen = ranker.select("q", ["z", "x", "x", "y"])
    assert chosen.index == 1
    assert chosen.order() == [1, 3, 0, 2]  # the repeat of "x" after the distinct "y" and "z"


def test_tool_calls_go_first_unscored_and_plain_answers_keep_their_order():
    assert tool_call_order([False, False]) is None
    assert tool_call_order([False, True, False, True]) == [1, 3, 0, 2]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("candidates", "logprobs", "error", "match"),
    [
        ([], None, ValueError, "candidates must be a non-empty list"),
        ("a string", None, TypeError, "candidates must be a list"),
        (["a", None], None, TypeError, r"candidates\[1\]"),
        (["a", "b"], [-1.0], ValueError, "logprobs must have one value per candidate"),
        (["a", "b"], [-1.0, math.nan], ValueError, r"logprobs\[1\] must be finite"),
        (["a", "b"], [-math.inf, -1.0], ValueError, r"logprobs\[0\] must be finite"),
        (["a", "b"], [None, -1.0], ValueError, "mixes numbers and None"),
        (["a", "b"], ["-1", -1.0], TypeError, r"logprobs\[0\] must be a number"),
        (["a", "b"], -1.0, TypeError, "logprobs must be a list"),
    ],
)
def test_bad_input_raises_naming_the_field(candidates, logprobs, error, match):
    ranker, _ = reranker({}, scorer=1.0)
    with pytest.raises(error, match=match):
        ranker.select("q", candidates, logprobs=logprobs)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_scorer_that_gives_non_finite_scores_is_refused(bad):
    ranker, _ = reranker({"a": bad, "b": 0.5}, scorer=1.0)
    with pytest.raises(ValueError, match="scores must be finite"):
        ranker.select("q", ["a", "b"])
    ranker, _ = reranker({"a": bad}, scorer=1.0)  # a lone candidate too, where it is scored
    with pytest.raises(ValueError, match="scores must be finite"):
        ranker.selector(score_single=True).select("q", ["a"])


def test_a_scorer_that_loses_candidates_is_refused():
    class Short:
        def score(self, instruction, responses):
            return [0.5]

    with pytest.raises(ValueError, match="returned 1 scores for 2 candidates"):
        Reranker(Short(), combiner=combiner(scorer=1.0)).select("q", ["a", "b", " a"])


def test_all_none_logprobs_mean_none():
    ranker, _ = reranker({"a": 0.9}, scorer=1.0)
    assert ranker.select("q", ["a", "b"], logprobs=[None, None]).index == 0


def test_unknown_signal_names_are_refused():
    with pytest.raises(ValueError, match="signals must be names"):
        Reranker(None, signals=("scorer", "vibes"))


# ------------------------------------------------------------------------------ the combiner


def test_combiner_uses_the_largest_fitted_subset_and_round_trips_through_config():
    both = Combiner(
        {"agreement+scorer": {"scorer": 1.0, "agreement": 2.0}, "scorer": {"scorer": 1}}
    )
    assert both.weights_for({"scorer", "agreement", "length"}) == {"scorer": 1.0, "agreement": 2.0}
    assert both.weights_for({"scorer", "length"}) == {"scorer": 1.0}
    # No fitted set within what is available: the closest one, its missing signals dropped.
    assert both.weights_for({"agreement", "length"}) == {"agreement": 2.0}
    with pytest.raises(ValueError, match="no selection weights fit"):
        both.weights_for({"length"})
    assert Combiner.from_config(json.loads(json.dumps(both.to_config()))) == both


@pytest.mark.parametrize(
    "weights",
    [{}, {"scorer+agreement": {"scorer": 1.0, "agreement": 1.0}}, {"scorer": {"scorer": math.nan}}],
)
def test_combiner_refuses_malformed_weights(weights):
    with pytest.raises(ValueError):
        Combiner(weights)
    if weights:  # the same checks hold for the judged table, which names itself
        with pytest.raises(ValueError, match="judged"):
            Combiner({"scorer": {"scorer": 1.0}}, judged=weights)


class FixedLM:
    """A local LM whose log-likelihood of each text is given by a table; records its calls."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.calls = 0

    def log_likelihood(self, instructions, texts):
        self.calls += 1
        return [(self.table[t], self.table[t] / 2, 2) for t in texts]


def test_options_judged_by_a_local_lm_use_the_judged_weights_and_given_logprobs_do_not():
    # Sampled answers: the generator's log-probability counts; options the LM judged: the
    # scorer does (a table each), so the same numbers choose differently by where they came from.
    weights = Combiner(
        {"logprob+scorer": {"logprob": 3.0, "scorer": 0.1}, "scorer": {"scorer": 1.0}},
        judged={"logprob+scorer": {"logprob": 0.1, "scorer": 3.0}},
    )
    scorer = FakeScorer({"Canberra.": 0.8, "Sydney.": 0.2})
    lm = FixedLM({"Canberra.": -9.0, "Sydney.": -2.0})
    options = ["Sydney.", "Canberra."]

    judged = Reranker(scorer, combiner=weights, lm=lm).select("The capital of Australia?", options)
    assert lm.calls == 1
    assert judged.response == "Canberra."
    assert judged.weights == {"logprob": 0.1, "scorer": 3.0}

    given = Reranker(scorer, combiner=weights, lm=lm).select(
        "The capital of Australia?", options, logprobs=[-2.0, -9.0]
    )
    assert lm.calls == 1  # given log-probabilities are used as they are
    assert given.response == "Sydney." and given.weights == {"logprob": 3.0, "scorer": 0.1}

    # Without a judged table, the main one serves judged candidates too.
    plain = Combiner({"logprob+scorer": {"logprob": 3.0, "scorer": 0.1}})
    assert Reranker(scorer, combiner=plain, lm=lm).select("q", options).response == "Sydney."


def test_the_judged_table_round_trips_through_the_checkpoint_config():
    weights = Combiner(
        {"scorer": {"scorer": 1.0}},
        {"note": "x"},
        judged={"logprob+scorer": {"logprob": 0.5, "scorer": 2.0}},
    )
    config = json.loads(json.dumps(weights.to_config()))
    assert config["judged"] == {"logprob+scorer": {"logprob": 0.5, "scorer": 2.0}}
    assert Combiner.from_config(config) == weights
    # the signals a reranker computes include those only the judged table weighs
    assert set(Reranker(None, combiner=weights).signals) == {"scorer", "logprob"}
    # a config without the table (every checkpoint written before it) reads as before
    assert "judged" not in Combiner({"scorer": {"scorer": 1.0}}).to_config()


def test_fit_weights_learns_which_signal_tracks_quality():
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(200):
        good = rng.normal(size=8)
        noise = rng.normal(size=8)
        quality = good + 0.1 * rng.normal(size=8)
        sets.append(({"scorer": good, "agreement": noise}, quality))
    weights = fit_weights(sets, ("scorer", "agreement"), temperature=0.2, l2=1e-3)
    assert weights["scorer"] > 1.0 > abs(weights["agreement"]) * 5
    flipped = [({"scorer": -v["scorer"], "agreement": v["agreement"]}, q) for v, q in sets]
    assert fit_weights(flipped, ("scorer", "agreement"), temperature=0.2, l2=1e-3)["scorer"] < -1


def test_signal_values_are_present_only_when_their_inputs_are():
    values = signal_values(["a b", "c"], scores=np.array([0.5, 0.9]))
    assert set(values) == {"scorer", "agreement", "length"}
    values = signal_values(
        ["a b", "c"], logprobs=np.array([-2.0, -1.0]), token_counts=np.array([2, 1])
    )
    assert set(values) == {"agreement", "logprob", "logprob_mean", "length"}
    assert values["logprob_mean"].tolist() == [-1.0, -1.0]


def test_huge_candidates_and_conversations_cost_no_more_than_long_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    tokens = agreement.tokens

    def recording(text: str) -> list[str]:
        seen.append(len(text))
        return tokens(text)

    monkeypatch.setattr(agreement, "tokens", recording)
    huge = "the answer is forty two and nothing else " * 150_000  # 6 MB
    texts = [huge, "the answer is 42", "the answer is forty two"]
    agree = agreement.rouge_agreement(texts)
    echoed = agreement.echo(huge + " what is the answer", texts)
    counts = agreement.word_counts(texts)
    limit = max(agreement.MAX_CANDIDATE_WORDS, agreement.MAX_INSTRUCTION_WORDS) * 32
    assert max(seen) <= limit  # never the whole 6 MB
    assert counts[0] == agreement.MAX_CANDIDATE_WORDS
    assert agree[2] > agree[1]  # still compared by what it says: "forty two" agrees with it
    assert echoed[0] == pytest.approx(1.0)  # and it still repeats the prompt
