"""The real packaged models: fetched once into the capplug cache, loaded, and used."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from capplug import Scorer, resolve

pytestmark = pytest.mark.integration

INSTRUCTIONS = [
    "What is the capital of France?",
    "Translate to German: The cat sleeps on the mat.",
    "Q: Is the following sentence plausible? 'The goalkeeper scored a touchdown.'\nA:",
    "Summarise in one sentence: "
    + "The committee met for three hours and agreed on the budget. " * 20,
]
RESPONSES = [
    "Paris.",
    "Lyon is the capital.",
    "",
    "Die Katze schläft auf der Matte.",
    "no",
    "yes " * 40,
]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def minilm_scorer(request: pytest.FixtureRequest) -> Scorer:
    return Scorer.from_backbone("minilm", seed=0, dtype=request.param)


# Float32 scores do not move with the batch a pair lands in; bfloat16 rounds differently for
# other batch shapes, by about 1e-4 in score.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-3}


def test_minilm_scores_are_finite_probabilities(minilm_scorer: Scorer) -> None:
    for instruction in INSTRUCTIONS:
        scores = minilm_scorer.score(instruction, RESPONSES)
        assert len(scores) == len(RESPONSES)
        assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)


def test_minilm_scores_do_not_depend_on_batch_size_or_order(minilm_scorer: Scorer) -> None:
    pairs = [(i, r) for i in INSTRUCTIONS for r in RESPONSES] * 2  # each pair in two places
    atol = TOLERANCE[minilm_scorer.precision.dtype]
    minilm_scorer.max_batch_size = 64
    reference = np.array(minilm_scorer.score_pairs(pairs))
    minilm_scorer.max_batch_size = 7
    np.testing.assert_allclose(minilm_scorer.score_pairs(pairs), reference, atol=atol, rtol=0)
    # One pair per call: every fifth pair (each instruction, each response), since a call per
    # pair is slow on a CPU without native bfloat16.
    every_fifth = list(range(0, len(pairs), 5))
    minilm_scorer.max_batch_size = 1
    alone = minilm_scorer.score_pairs([pairs[i] for i in every_fifth])
    np.testing.assert_allclose(alone, reference[every_fifth], atol=atol, rtol=0)
    perm = np.random.default_rng(0).permutation(len(pairs))
    shuffled = np.array(minilm_scorer.score_pairs([pairs[i] for i in perm]))
    np.testing.assert_allclose(shuffled, reference[perm], atol=atol, rtol=0)


def test_smollm2_is_converted_from_gguf_and_answers() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_backbone_scores_finite_probabilities() -> None:
    scorer = Scorer.from_backbone("smollm2-135m-instruct", seed=0, max_length=256, dtype="float32")
    scores = scorer.score(INSTRUCTIONS[0], RESPONSES)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    np.testing.assert_allclose(
        scores, [scorer.score(INSTRUCTIONS[0], [r])[0] for r in RESPONSES], atol=1e-5
    )


def test_models_path_command_prints_the_cached_folder() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "capplug.cli", "models", "path", "minilm"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(resolve("minilm"))


def test_mpnet_is_joined_from_its_split_zip_and_scores() -> None:
    folder = resolve("mpnet")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mpnet"
    assert not list(folder.glob("*.zip*")) and not list(folder.rglob("desktop.ini"))
    scorer = Scorer.from_backbone("mpnet", seed=0, max_length=128)
    scores = scorer.score(INSTRUCTIONS[0], RESPONSES)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    # MPNet takes no token type ids and loses two positions to its padding offset.
    assert not scorer._uses_type_ids and scorer.max_length <= 128


def test_bundled_default_scorer_loads_offline_and_is_small(monkeypatch: pytest.MonkeyPatch) -> None:
    from capplug.models import bundled_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shipped = bundled_path("capplug-default")
    assert sum(p.stat().st_size for p in shipped.iterdir()) < 60 * 2**20
    scorer = Scorer.from_pretrained("capplug-default")
    assert scorer.score_mapping == "sigmoid"
    scores = scorer.score(INSTRUCTIONS[0], RESPONSES)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    # The rebuilt checkpoint is cached: a second load reuses the same folder.
    assert resolve("capplug-default") == resolve("capplug-default")


def test_scorer_with_no_argument_is_the_bundled_default() -> None:
    default, named = Scorer(), Scorer.from_pretrained("capplug-default")
    assert default.score(INSTRUCTIONS[0], RESPONSES) == named.score(INSTRUCTIONS[0], RESPONSES)
