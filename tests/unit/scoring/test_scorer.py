"""The Scorer on tiny random checkpoints: loading, score mapping, batching, truncation, input checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import capplug.scoring.model as scorer_module
from capplug import CheckpointError, Ranked, Scorer, TruncationWarning
from capplug.scoring._checkpoint import recorded_mapping

QUESTION = "what is the capital of france ?"
RESPONSES = ["paris", "lyon", "", "the capital of france is paris .", "london"]


@pytest.fixture(scope="module")
def scorer(tiny_bert_scorer: Path) -> Scorer:
    return Scorer.from_pretrained(tiny_bert_scorer)


def test_scores_are_probabilities_in_input_order(scorer: Scorer) -> None:
    scores = scorer.score(QUESTION, RESPONSES)
    assert len(scores) == len(RESPONSES)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    one_by_one = [scorer.score(QUESTION, [r])[0] for r in RESPONSES]
    np.testing.assert_allclose(scores, one_by_one, atol=1e-6)


def test_sigmoid_mapping_matches_the_raw_model(scorer: Scorer, tiny_bert_scorer: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_scorer).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_scorer)
    enc = tokenizer([QUESTION] * 2, ["paris", "lyon"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = torch.sigmoid(model(**enc).logits[:, 0]).tolist()
    np.testing.assert_allclose(scorer.score(QUESTION, ["paris", "lyon"]), expected, atol=1e-5)


def test_batch_size_and_order_do_not_change_scores(tiny_bert_scorer: Path) -> None:
    rng = np.random.default_rng(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "what",
        "is",
        "capital",
        "of",
        "france",
        "paris",
        "blue",
        "sky",
        "one",
        "two",
    ]
    pairs = [
        (
            " ".join(rng.choice(words, rng.integers(1, 60))),
            " ".join(rng.choice(words, rng.integers(0, 20))),
        )
        for _ in range(50)
    ]
    results = []
    for batch_size in (1, 7, 64):
        scorer = Scorer.from_pretrained(tiny_bert_scorer)
        scorer.max_batch_size = batch_size
        results.append(np.array(scorer.score_pairs(pairs)))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)
    np.testing.assert_allclose(results[0], results[2], atol=1e-5)
    perm = rng.permutation(len(pairs))
    shuffled = np.array(scorer.score_pairs([pairs[i] for i in perm]))
    np.testing.assert_allclose(shuffled, results[2][perm], atol=1e-5)


def test_rank_and_select_put_the_best_first(scorer: Scorer) -> None:
    scores = scorer.score(QUESTION, RESPONSES)
    ranked = scorer.rank(QUESTION, RESPONSES)
    assert [r.index for r in ranked] == sorted(range(len(scores)), key=lambda i: -scores[i])
    assert all(isinstance(r, Ranked) and r.response == RESPONSES[r.index] for r in ranked)
    assert [r.score for r in ranked] == sorted(scores, reverse=True)
    top2 = scorer.rank(QUESTION, RESPONSES, top_k=2)
    assert top2 == ranked[:2]
    best = scorer.select(QUESTION, RESPONSES)
    assert best == ranked[0]


def test_chat_instructions_are_flattened_the_same_way_for_dicts_and_messages(
    scorer: Scorer,
) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}]
    messages = [
        SimpleNamespace(type="system", content="be brief"),
        SimpleNamespace(type="human", content=QUESTION),
    ]
    flat = "system: be brief\nuser: " + QUESTION
    np.testing.assert_allclose(
        scorer.score(chat, ["paris"]), scorer.score(messages, ["paris"]), atol=1e-6
    )
    np.testing.assert_allclose(
        scorer.score(chat, ["paris"]), scorer.score(flat, ["paris"]), atol=1e-6
    )
    single_turn = [{"role": "user", "content": QUESTION}]
    np.testing.assert_allclose(
        scorer.score(single_turn, ["paris"]), scorer.score(QUESTION, ["paris"]), atol=1e-6
    )


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda s: s.score(QUESTION, []), ValueError, "non-empty"),
        (lambda s: s.score(QUESTION, "paris"), TypeError, "not a single string"),
        (lambda s: s.score(QUESTION, ["paris", None]), TypeError, "responses[1]"),
        (lambda s: s.score(QUESTION, None), TypeError, "responses must be a list"),
        (lambda s: s.score(None, ["paris"]), TypeError, "instruction must be a string"),
        (lambda s: s.score(42, ["paris"]), TypeError, "instruction must be a string"),
        (lambda s: s.score([], ["paris"]), ValueError, "empty chat"),
        (lambda s: s.score([{"content": "hi"}], ["paris"]), ValueError, "no role"),
        (lambda s: s.score_pairs([]), ValueError, "non-empty"),
        (lambda s: s.score_pairs([("q",)]), TypeError, "pairs[0]"),
        (lambda s: s.score_pairs([("q", 3)]), TypeError, "pairs[0][1]"),
        (lambda s: s.rank(QUESTION, ["a"], top_k=0), ValueError, "top_k"),
    ],
)
def test_bad_input_names_the_argument(scorer: Scorer, call, error, fragment: str) -> None:
    with pytest.raises(error, match=None) as info:
        call(scorer)
    assert fragment in str(info.value)


def test_empty_strings_are_scored(scorer: Scorer) -> None:
    (score,) = scorer.score("", [""])
    assert 0.0 <= score <= 1.0


def test_truncation_keeps_the_response_and_the_end_of_the_instruction(
    tiny_bert_scorer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "_warned_truncation", False)
    scorer = Scorer.from_pretrained(tiny_bert_scorer, max_length=16)
    long_instruction = "one two three four five six seven eight nine ten " * 3 + "capital of france"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (pair,) = scorer.encode([long_instruction], ["paris is blue"])
        scorer.encode([long_instruction], ["paris"])
    assert [w.category for w in caught] == [TruncationWarning]  # once per process
    tokens = scorer.tokenizer.convert_ids_to_tokens(pair.ids)
    assert len(pair.ids) == 16
    assert tokens[-5:] == ["[SEP]", "paris", "is", "blue", "[SEP]"]  # the whole response
    assert tokens[1:11][-3:] == ["capital", "of", "france"]  # the instruction's end

    # A response over its cap keeps its beginning.
    capped = Scorer.from_pretrained(tiny_bert_scorer, max_length=16, max_response_tokens=3)
    (pair,) = capped.encode(
        [long_instruction], ["one two three four five six seven eight nine ten"]
    )
    tokens = capped.tokenizer.convert_ids_to_tokens(pair.ids)
    assert tokens[-4:] == ["one", "two", "three", "[SEP]"]
    assert len(pair.ids) == 16


def test_a_huge_conversation_is_cut_before_it_is_tokenised(tiny_bert_scorer: Path) -> None:
    scorer = Scorer.from_pretrained(tiny_bert_scorer, max_length=16)
    seen: list[int] = []
    encode_batch = scorer._encoder.encode_batch

    def recording(texts: list[str], **kwargs: object) -> object:
        seen.extend(len(t) for t in texts)
        return encode_batch(texts, **kwargs)

    scorer._encoder.encode_batch = recording
    huge = "one two three four five six seven eight nine ten " * 100_000  # 5 MB
    question = huge + "capital of france"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        scores = scorer.score(question, ["paris " + huge, "lyon"])
        (pair,) = scorer.encode([question], ["paris " + huge])
    assert max(seen) <= 16 * 16  # max_length tokens' worth of characters, never the 5 MB
    # ... and what is kept is what tokenising everything and cutting would have kept.
    tokens = scorer.tokenizer.convert_ids_to_tokens(pair.ids)
    assert len(pair.ids) == 16
    assert tokens[3:8] == ["capital", "of", "france", "[SEP]", "paris"]
    assert tokens[8:11] == ["one", "two", "three"]
    assert scores == scorer.score(question[-4000:], ["paris " + huge[:4000], "lyon"])


def test_short_instruction_leaves_room_for_a_long_response(tiny_bert_scorer: Path) -> None:
    scorer = Scorer.from_pretrained(tiny_bert_scorer, max_length=16)
    (pair,) = scorer.encode(["paris"], ["one two three four five six seven eight nine ten eleven"])
    tokens = scorer.tokenizer.convert_ids_to_tokens(pair.ids)
    assert tokens[:3] == ["[CLS]", "paris", "[SEP]"]
    assert len(pair.ids) == 16


def test_raw_regression_roberta_like_cappy_is_clipped(tiny_roberta_regression: Path) -> None:
    with pytest.raises(CheckpointError, match="score_mapping"):
        Scorer.from_pretrained(tiny_roberta_regression)
    scorer = Scorer.from_pretrained(tiny_roberta_regression, score_mapping="clip")
    pairs = [(QUESTION, r) for r in RESPONSES] + [("blue sky", "red green"), ("one two", "three")]
    scores = scorer.score_pairs(pairs)
    assert all(0.0 <= s <= 1.0 for s in scores)
    # The head was widened so raw logits fall outside [0, 1]: scores are the clipped raw logits.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_roberta_regression).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta_regression)
    raw = []
    with torch.no_grad():
        for instruction, response in pairs:
            enc = tokenizer(instruction, response, return_tensors="pt")
            raw.append(model(**enc).logits[0, 0].item())
    assert min(raw) < 0.0 or max(raw) > 1.0
    np.testing.assert_allclose(scores, np.clip(raw, 0.0, 1.0), atol=1e-5)
    # RoBERTa loses two positions to its padding offset.
    assert scorer.max_length <= 128


def test_cappy_mapping_is_known_by_its_hub_id() -> None:
    config = SimpleNamespace()
    assert recorded_mapping(config, "btan2/cappy-large") == "clip"


def test_mapping_recorded_by_sentence_transformers_is_honoured() -> None:
    config = SimpleNamespace(
        sentence_transformers={"activation_fn": "torch.nn.modules.activation.Sigmoid"}
    )
    assert recorded_mapping(config, "some/model") == "sigmoid"


def test_bare_backbone_is_refused_by_from_pretrained_and_taken_by_from_backbone(
    tiny_bert_backbone: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="from_backbone"):
        Scorer.from_pretrained(tiny_bert_backbone)
    fresh = Scorer.from_backbone(tiny_bert_backbone, seed=3)
    again = Scorer.from_backbone(tiny_bert_backbone, seed=3)
    assert fresh.score_mapping == "sigmoid"
    np.testing.assert_allclose(fresh.score(QUESTION, RESPONSES), again.score(QUESTION, RESPONSES))
    saved = fresh.save_pretrained(tmp_path / "ckpt")
    config = json.loads((saved / "config.json").read_text())
    assert config["capplug_score_mapping"] == "sigmoid"
    assert not list(saved.glob("*.bin"))
    reloaded = Scorer.from_pretrained(saved)
    np.testing.assert_allclose(
        reloaded.score(QUESTION, RESPONSES), fresh.score(QUESTION, RESPONSES), atol=1e-6
    )


def test_pickled_weights_are_refused(tiny_bert_scorer: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert_scorer, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors"):
        Scorer.from_pretrained(folder)


def test_multi_label_head_is_refused(tiny_bert_scorer: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "three-labels"
    shutil.copytree(tiny_bert_scorer, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="single"):
        Scorer.from_pretrained(folder)


def test_onednn_routing_keeps_scores_and_gradients(tiny_bert_scorer: Path) -> None:
    routed = Scorer.from_pretrained(tiny_bert_scorer)
    plain = Scorer.from_pretrained(tiny_bert_scorer)
    for module in plain.model.modules():
        module.__dict__.pop("forward", None)  # back to torch's own Linear.forward
    if not any("forward" in m.__dict__ for m in routed.model.modules()):
        pytest.skip("this torch build has no oneDNN linear op")
    np.testing.assert_allclose(
        routed.score(QUESTION, RESPONSES), plain.score(QUESTION, RESPONSES), atol=1e-6
    )
    # With gradients on (training), the routed layers fall back to F.linear and backpropagate.
    inputs = routed.collate(routed.encode([QUESTION], ["paris"]))
    routed.model.train()
    routed.model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for p in routed.model.classifier.parameters())
    assert "forward" not in routed.model.state_dict()


def test_loaded_model_needs_its_tokenizer_and_mapping(tiny_bert_scorer: Path) -> None:
    scorer = Scorer.from_pretrained(tiny_bert_scorer)
    with pytest.raises(TypeError, match="score_mapping"):
        Scorer(scorer.model, scorer.tokenizer)
    with pytest.raises(TypeError, match="neither"):
        Scorer(tokenizer=scorer.tokenizer)
    again = Scorer(scorer.model, scorer.tokenizer, score_mapping="sigmoid")
    assert again.score(QUESTION, ["paris"]) == scorer.score(QUESTION, ["paris"])


def test_scoring_in_chunks_gives_the_scores_of_one_pass(scorer: Scorer) -> None:
    # On a GPU pairs are tokenised in chunks while the device runs the previous ones.
    pairs = [(f"{QUESTION} {i}", r) for i in range(7) for r in RESPONSES]
    whole = scorer.score_pairs(pairs)
    scorer.chunk_pairs = 4
    try:
        np.testing.assert_allclose(scorer.score_pairs(pairs), whole, atol=1e-6)
    finally:
        scorer.chunk_pairs = None


def test_load_scorer_takes_a_reference_a_scorer_or_nothing(tiny_bert_scorer: Path) -> None:
    from capplug.scoring import load_scorer

    loaded = load_scorer(tiny_bert_scorer)
    assert isinstance(loaded, Scorer)
    assert load_scorer(loaded) is loaded  # used as it is
    with pytest.raises(TypeError, match="capplug-default"):
        load_scorer(42)
