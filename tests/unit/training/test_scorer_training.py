"""Training the scorer: it learns, it resumes exactly, and bad data is reported before anything runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from capplug import Scorer
from capplug.data.rows import LabelledPair, RowError, read_labelled_pairs
from capplug.training.losses import ListwiseLoss, RankLoss
from capplug.training.scorer import (
    TrainConfig,
    _epoch_batches,
    _group_ids,
    split_heldout,
    train_scorer,
)


def toy_pairs(n: int = 48) -> list[LabelledPair]:
    pairs = []
    for i in range(n):
        question = f"what is {i % 5} plus one ?"
        pairs.append(LabelledPair(question, "yes the answer is one", 1.0, f"g{i}"))
        pairs.append(LabelledPair(question, "no cat dog sat", 0.0, f"g{i}"))
    return pairs


CONFIG = dict(
    learning_rate=3e-3,
    batch_size=8,
    epochs=2,
    eval_every=4,
    log_every=2,
    freeze_embeddings=False,
    warmup_ratio=0.1,
)


def test_heldout_cap_never_splits_an_example_across_train_and_heldout() -> None:
    # Ten pairs per example: a cap of 15 pairs falls in the middle of the second held-out example.
    pairs = [LabelledPair(f"q{g}", f"r{i}", 1.0, f"g{g}") for g in range(200) for i in range(10)]
    train, heldout = split_heldout(pairs, fraction=0.5, max_pairs=15, seed=0)
    assert {p.group for p in train}.isdisjoint({p.group for p in heldout})
    assert len({p.group for p in heldout}) == 2 and len(heldout) == 20
    assert len(train) + len(heldout) == len(pairs)


def test_heldout_slice_under_the_cap_does_not_depend_on_row_order() -> None:
    # 400 examples of 5 pairs, about 100 eligible at fraction 0.25: a cap of 50 pairs binds.
    pairs = [LabelledPair(f"q{g}", f"r{i}", 1.0, f"g{g}") for g in range(400) for i in range(5)]
    shuffled = list(pairs)
    random.Random(3).shuffle(shuffled)
    _, heldout = split_heldout(pairs, fraction=0.25, max_pairs=50, seed=0)
    _, heldout_shuffled = split_heldout(shuffled, fraction=0.25, max_pairs=50, seed=0)
    assert len(heldout) == 50
    assert {p.group for p in heldout} == {p.group for p in heldout_shuffled}
    # Uncapped, every eligible group is held out, whatever the order.
    _, all_eligible = split_heldout(shuffled, fraction=0.25, max_pairs=10**6, seed=0)
    assert {p.group for p in heldout} < {p.group for p in all_eligible}
    assert 60 < len({p.group for p in all_eligible}) < 140


def test_training_learns_the_labels_and_writes_a_loadable_model(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    train, heldout = split_heldout(toy_pairs(), fraction=0.25, seed=1)
    assert {p.group for p in train}.isdisjoint({p.group for p in heldout})
    scorer = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    before = scorer.score("what is 2 plus one ?", ["yes the answer is one", "no cat dog sat"])
    result = train_scorer(
        scorer,
        train,
        tmp_path / "run",
        eval_pairs=heldout,
        config=TrainConfig(**{**CONFIG, "epochs": 8}),
        progress=False,
    )
    after = Scorer.from_pretrained(tmp_path / "run").score(
        "what is 2 plus one ?", ["yes the answer is one", "no cat dog sat"]
    )
    assert after[0] - after[1] > before[0] - before[1] + 0.2
    assert result.metrics["pairwise_accuracy"] == 1.0
    log = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    assert any("loss" in e for e in log) and any("eval" in e for e in log)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "steps:" in card and "wall time" in card and "pairwise_accuracy" in card


def test_training_that_only_makes_the_heldout_worse_returns_the_starting_scorer(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    # Labels flipped in training but not in the held-out slice: every step is worse than the start.
    train, heldout = split_heldout(toy_pairs(), fraction=0.25, seed=1)
    flipped = [LabelledPair(p.instruction, p.response, 1.0 - p.label, p.group) for p in train]
    scorer = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    question, answers = "what is 2 plus one ?", ["yes the answer is one", "no cat dog sat"]
    start = scorer.score(question, answers)
    result = train_scorer(
        scorer,
        flipped,
        tmp_path / "run",
        eval_pairs=heldout,
        config=TrainConfig(**{**CONFIG, "epochs": 4}),
        progress=False,
    )
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["metrics"]["loss"] == pytest.approx(summary["metrics_before"]["loss"], abs=1e-5)
    log = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    later = [e["eval"]["loss"] for e in log if "eval" in e and e["step"] > 0]
    assert later and min(later) > summary["metrics_before"]["loss"]
    assert result.steps > 0
    reloaded = Scorer.from_pretrained(tmp_path / "run").score(question, answers)
    assert reloaded == pytest.approx(start, abs=1e-4)
    assert "before training" in (tmp_path / "run" / "README.md").read_text()


@pytest.mark.parametrize("rank_weight", [0.0, 1.0], ids=["pointwise", "with-ranking"])
def test_an_interrupted_run_resumes_to_the_same_weights(
    tiny_bert_backbone: Path, tmp_path: Path, rank_weight: float
) -> None:
    pairs = toy_pairs(32)
    config = TrainConfig(**{**CONFIG, "patience": None, "rank_weight": rank_weight})

    straight = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    train_scorer(straight, pairs, tmp_path / "straight", config=config, progress=False)

    def stop_at_step_6(step: int, _entry: dict) -> None:
        if step == 6:
            raise KeyboardInterrupt

    first = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train_scorer(
            first,
            pairs,
            tmp_path / "resumed",
            config=config,
            progress=False,
            on_step=stop_at_step_6,
        )
    assert not (tmp_path / "resumed" / "config.json").exists()
    second = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    result = train_scorer(second, pairs, tmp_path / "resumed", config=config, progress=False)
    assert result.steps == 16  # 64 pairs / batch 8 x 2 epochs
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def graded_pairs(n: int) -> list[LabelledPair]:
    """Three responses an example, graded 1 / 0.5 / 0."""
    pairs = []
    for i in range(n):
        question = f"what is {i % 5} plus one ?"
        for response, label in (("yes the answer is one", 1.0), ("maybe one", 0.5), ("cat", 0.0)):
            pairs.append(LabelledPair(question, response, label, f"g{i}"))
    return pairs


def test_ranking_loss_batches_whole_examples_and_scores_the_order() -> None:
    config = TrainConfig(batch_size=8, rank_weight=1.0)
    pairs = graded_pairs(40)
    groups = _group_ids(pairs)
    batches = _epoch_batches([(None, p.label) for p in pairs], config, 0, groups)  # type: ignore[misc]
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    assert all(len(b) <= 8 for b in batches)
    for batch in batches:  # every example's three responses sit in one batch
        assert all(
            groups.count(g) == [groups[i] for i in batch].count(g)
            for g in {groups[i] for i in batch}
        )
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 1, 2])  # only the first two responses belong to one example
    assert RankLoss()(torch.zeros(4), labels, ids).item() == pytest.approx(np.log(2))
    ordered = RankLoss()(torch.tensor([4.0, -4.0, 0.0, 9.0]), labels, ids).item()
    assert ordered == pytest.approx(np.log1p(np.exp(-8.0)))  # the cross-example 9.0 is ignored
    with pytest.raises(ValueError, match="rank_weight"):
        train_scorer(None, pairs, "unused", config=TrainConfig(rank_weight=-1.0))  # type: ignore[arg-type]


def test_listwise_loss_is_the_right_options_cross_entropy_within_each_example() -> None:
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    ids = torch.tensor([0, 0, 0, 1, 1, 2])  # example 1's labels tie; example 2 has one response
    # Example 0 alone counts: uniform logits give the right option probability 1/3.
    assert ListwiseLoss()(torch.zeros(6), labels, ids).item() == pytest.approx(np.log(3))
    sure = torch.tensor([6.0, 0.0, 0.0, -9.0, 9.0, 9.0])
    assert ListwiseLoss()(sure, labels, ids).item() == pytest.approx(
        -np.log(np.exp(6.0) / (np.exp(6.0) + 2.0)), rel=1e-4
    )
    none = ListwiseLoss()(torch.zeros(2, requires_grad=True), torch.ones(2), torch.tensor([0, 0]))
    none.backward()  # no example qualifies: zero, and still a graph
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="listwise_weight"):
        train_scorer(None, toy_pairs(), "unused", config=TrainConfig(listwise_weight=-1.0))  # type: ignore[arg-type]


def test_training_with_the_listwise_loss_picks_each_examples_right_option(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    train, heldout = split_heldout(graded_pairs(48), fraction=0.25, seed=1)
    scorer = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    result = train_scorer(
        scorer,
        train,
        tmp_path / "run",
        eval_pairs=heldout,
        config=TrainConfig(**{**CONFIG, "epochs": 8, "listwise_weight": 1.0}),
        progress=False,
    )
    assert result.metrics["listwise_loss"] < result.metrics_before["listwise_loss"]
    assert result.metrics["loss"] == pytest.approx(
        result.metrics["pointwise_loss"] + result.metrics["listwise_loss"], rel=1e-5
    )
    scores = Scorer.from_pretrained(tmp_path / "run").score(
        "what is 2 plus one ?", ["yes the answer is one", "maybe one", "cat"]
    )
    assert scores[0] == max(scores)
    assert "+ 1.0 x listwise" in (tmp_path / "run" / "README.md").read_text()


def test_training_with_the_ranking_loss_orders_each_examples_responses(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    train, heldout = split_heldout(graded_pairs(48), fraction=0.25, seed=1)
    scorer = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    result = train_scorer(
        scorer,
        train,
        tmp_path / "run",
        eval_pairs=heldout,
        config=TrainConfig(**{**CONFIG, "epochs": 8, "rank_weight": 1.0}),
        progress=False,
    )
    assert result.metrics["pairwise_accuracy"] == 1.0
    assert result.metrics["rank_loss"] < result.metrics_before["rank_loss"]
    assert result.metrics["loss"] == pytest.approx(
        result.metrics["pointwise_loss"] + result.metrics["rank_loss"], rel=1e-5
    )
    good, middling, bad = Scorer.from_pretrained(tmp_path / "run").score(
        "what is 2 plus one ?", ["yes the answer is one", "maybe one", "cat"]
    )
    assert good > middling > bad
    assert "+ 1.0 x rank" in (tmp_path / "run" / "README.md").read_text()


def test_a_finished_run_is_never_overwritten(tiny_bert_backbone: Path, tmp_path: Path) -> None:
    pairs = toy_pairs(8)
    config = TrainConfig(**{**CONFIG, "epochs": 1})
    train_scorer(
        Scorer.from_backbone(tiny_bert_backbone),
        pairs,
        tmp_path / "run",
        config=config,
        progress=False,
    )
    saved = (tmp_path / "run" / "model.safetensors").read_bytes()
    # Another run with other data into the same folder is refused, and the model is untouched.
    with pytest.raises(ValueError, match=r"other data|already holds"):
        train_scorer(
            Scorer.from_backbone(tiny_bert_backbone),
            toy_pairs(10),
            tmp_path / "run",
            config=config,
            progress=False,
        )
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == saved


def test_the_same_run_asked_again_refuses_instead_of_training_over_it(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    pairs = toy_pairs(8)
    config = TrainConfig(**{**CONFIG, "epochs": 1})
    train_scorer(Scorer.from_backbone(tiny_bert_backbone), pairs, tmp_path / "run", config=config)
    assert not (tmp_path / "run" / "checkpoint").exists()  # a finished run keeps no checkpoint
    saved = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a trained model"):
        train_scorer(
            Scorer.from_backbone(tiny_bert_backbone), pairs, tmp_path / "run", config=config
        )
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == saved


def test_a_scorer_trained_at_reduced_precision_scores_at_that_precision_again(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    # On a GPU a scorer loads in bfloat16; training keeps fp32 master weights and must hand
    # the scorer back at the precision its dtype says, or it scores at fp32 speed.
    Scorer.from_backbone(tiny_bert_backbone).save_pretrained(tmp_path / "start")
    scorer = Scorer.from_pretrained(tmp_path / "start", dtype=torch.bfloat16)
    assert scorer.dtype == torch.bfloat16
    config = TrainConfig(**{**CONFIG, "epochs": 1})
    train_scorer(scorer, toy_pairs(8), tmp_path / "run", config=config, progress=False)
    assert scorer.dtype == torch.bfloat16
    assert {p.dtype for p in scorer.model.bert.encoder.parameters()} == {torch.bfloat16}
    # The classifier head stays float32 at reduced precision, so close candidates keep their order.
    assert {p.dtype for p in scorer.model.classifier.parameters()} == {torch.float32}
    assert len(scorer.score("what is 1 plus one ?", ["yes", "cat"])) == 2


def test_bad_rows_are_listed_with_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [
        {"instruction": "q", "response": "a", "label": 0.5},
        {"instruction": "q", "response": "a", "label": 1.5},
        {"response": "a", "label": 1},
        "not json",
        {"instruction": "q", "response": "a"},
        {"instruction": "q", "response": 7, "label": 1},
    ]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RowError) as info:
        read_labelled_pairs(path)
    message = str(info.value)
    assert "5 of 6 rows" in message
    for fragment in (
        "row 2: 'label' 1.5 is outside [0, 1]",
        "row 3: missing 'instruction'",
        "row 4: not valid JSON",
        "row 5: give 'label'",
        "row 6: 'response' must be a string",
    ):
        assert fragment in message


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("instruction,response,label\n")
    with pytest.raises(ValueError, match="holds no rows"):
        read_labelled_pairs(path)


def test_csv_and_reference_rows_are_labelled_by_rouge(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(
        "instruction,response,reference,task,example_id\n"
        "name the capital,the capital is paris,paris is the capital,geo,1\n"
        "name the capital,berlin,paris is the capital,geo,1\n"
    )
    pairs = read_labelled_pairs(path)
    assert pairs[0].label > pairs[1].label == 0.0
    assert pairs[0].group == pairs[1].group == "geo#1"
    # Rouge-L F: the longest common subsequence ('the capital') is 2 of 4 tokens on each side.
    np.testing.assert_allclose(pairs[0].label, 0.5)
