"""LocalChatModel on a tiny random Llama with a chat template, built here, never downloaded."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from capplug.llms import CAPPY_RECIPE, Candidate, LocalChatModel, SamplingRecipe, SamplingStrategy
from capplug.testing import save_tiny_llama as _save_tiny_llama

PROMPTS = [
    "What is the capital of France?",
    "Is the sky blue? Answer yes or no.",
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "one plus two"}],
    "Where does the cat sit",
]
SMALL_RECIPE = SamplingRecipe(
    strategies=(
        SamplingStrategy(method="beam", n=1, num_beams=3),
        SamplingStrategy(n=2),
        SamplingStrategy(n=2, temperature=0.7),
        SamplingStrategy(n=2, top_k=5),
        SamplingStrategy(n=2, top_p=0.9),
    ),
    max_new_tokens=8,
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LocalChatModel:
    # float64 keeps round-off far below any sampling boundary, so batch-independence is exact.
    return LocalChatModel.from_pretrained(tiny_llama_dir, device="cpu", dtype="float64")


def _manual_logprobs(llm: LocalChatModel, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """Teacher-forced log-probs of ``tokens`` after ``prompt_ids``, one unpadded sequence."""
    ids = torch.tensor([prompt_ids + tokens])
    with torch.inference_mode():
        logits = llm.model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return [logprobs[start + i - 1, t].item() for i, t in enumerate(tokens)]


def _prompt_ids(llm: LocalChatModel, prompt) -> list[int]:
    return llm.tokenizer(llm.render(prompt), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------- loading


def test_loads_with_left_padding_and_eos_pad_fallback(llm: LocalChatModel) -> None:
    assert llm.tokenizer.padding_side == "left"
    assert llm.tokenizer.pad_token == "<|im_end|>"
    assert llm.pad_token_id == llm.tokenizer.eos_token_id
    assert llm.eos_token_ids == (llm.tokenizer.eos_token_id,)
    assert llm.model.dtype == torch.float64


def test_keeps_a_pad_token_the_tokenizer_already_has(tmp_path: Path) -> None:
    chat = LocalChatModel.from_pretrained(_save_tiny_llama(tmp_path, pad=True), device="cpu")
    assert chat.tokenizer.pad_token == "<|endoftext|>"
    # Candidates stop at end-of-turn even though padding is a different token.
    (candidates,) = chat.sample_candidates(PROMPTS[:1], recipe=SMALL_RECIPE, progress=False)
    for c in candidates:
        assert c.finished == (c.token_ids[-1] == chat.tokenizer.eos_token_id)
        assert chat.pad_token_id not in c.token_ids


def test_refuses_a_folder_without_safetensors(tmp_path: Path) -> None:
    from capplug.errors import CheckpointError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        LocalChatModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------- render


def test_render_wraps_a_string_as_one_user_turn_with_generation_prompt(llm: LocalChatModel) -> None:
    text = llm.render("What is the capital of France?")
    assert (
        text
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert llm.render([{"role": "user", "content": "What is the capital of France?"}]) == text


def test_render_accepts_message_objects_and_content_parts(llm: LocalChatModel) -> None:
    chat = [
        SimpleNamespace(type="system", content="Be brief."),
        SimpleNamespace(type="human", content=[{"type": "text", "text": "hi"}, "there"]),
    ]
    assert llm.render(chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi\nthere<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_without_a_chat_template_uses_the_flat_text(tmp_path: Path) -> None:
    chat = LocalChatModel.from_pretrained(_save_tiny_llama(tmp_path, chat_template=False))
    assert chat.render("the cat sat") == "the cat sat"
    assert chat.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == (
        "system: s\nuser: u"
    )


# ------------------------------------------------------------------------------- recipe


def test_cappy_recipe_is_one_beam_and_four_of_each_sampler() -> None:
    names = [s.name for s in CAPPY_RECIPE.strategies]
    assert names == ["beam4", "sample", "temp0.9", "topk40", "topp0.95"]
    assert [s.n for s in CAPPY_RECIPE.strategies] == [1, 4, 4, 4, 4]
    assert CAPPY_RECIPE.n_candidates == 17
    assert CAPPY_RECIPE.max_new_tokens == 64
    plain = CAPPY_RECIPE.strategies[1]
    assert (plain.temperature, plain.top_k, plain.top_p) == (1.0, None, None)
    assert SamplingStrategy(top_k=40, top_p=0.95, temperature=0.7).name == "temp0.7-topk40-topp0.95"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"method": "beam", "n": 5, "num_beams": 4}, "num_beams"),
        ({"method": "greedy", "n": 2}, "n"),
        ({"method": "nucleus"}, "method"),
    ],
)
def test_bad_strategy_numbers_are_refused_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingStrategy(**kwargs)


def test_bad_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SamplingRecipe(strategies=())
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingRecipe(strategies=(SamplingStrategy(),), max_new_tokens=0)
    with pytest.raises(TypeError, match=r"strategies\[0\]"):
        SamplingRecipe(strategies=({"n": 4},))  # type: ignore[arg-type]
    recipe = SamplingRecipe(strategies=[SamplingStrategy()])  # a list is kept as a tuple
    assert isinstance(recipe.strategies, tuple)


# --------------------------------------------------------------------------- candidates


@pytest.fixture(scope="module")
def drawn(llm: LocalChatModel) -> list[list[Candidate]]:
    return llm.sample_candidates(PROMPTS, recipe=SMALL_RECIPE, seed=0, batch_size=4, progress=False)


def test_candidates_follow_the_recipe_for_every_prompt(drawn: list[list[Candidate]]) -> None:
    expected = ["beam3"] + ["sample"] * 2 + ["temp0.7"] * 2 + ["topk5"] * 2 + ["topp0.9"] * 2
    assert len(drawn) == len(PROMPTS)
    for candidates in drawn:
        assert [c.strategy for c in candidates] == expected
        for c in candidates:
            assert c.text == c.text.strip()
            assert 1 <= c.n_tokens == len(c.token_ids) <= SMALL_RECIPE.max_new_tokens
            assert c.n_tokens == SMALL_RECIPE.max_new_tokens or c.finished
            assert math.isclose(c.mean_logprob, c.sum_logprob / c.n_tokens)
            assert c.sum_logprob < 0
    # Sampling actually samples: the same prompt's sampled candidates are not all the same.
    assert any(len({c.token_ids for c in cs[1:]}) > 1 for cs in drawn)
    assert any(c.finished for cs in drawn for c in cs)


def test_candidate_logprobs_are_the_raw_model_distribution(
    llm: LocalChatModel, drawn: list[list[Candidate]]
) -> None:
    # Warped strategies (temperature 0.7, top-k, top-p) must still report unwarped log-probs.
    for prompt, candidates in zip(PROMPTS, drawn, strict=True):
        prompt_ids = _prompt_ids(llm, prompt)
        for c in candidates:
            expected = _manual_logprobs(llm, prompt_ids, list(c.token_ids))
            assert c.sum_logprob == pytest.approx(sum(expected), abs=1e-6), c.strategy


def test_candidates_repeat_exactly_and_change_with_the_seed(
    llm: LocalChatModel, drawn: list[list[Candidate]]
) -> None:
    again = llm.sample_candidates(
        PROMPTS, recipe=SMALL_RECIPE, seed=0, batch_size=4, progress=False
    )
    assert again == drawn
    other = llm.sample_candidates(
        PROMPTS, recipe=SMALL_RECIPE, seed=1, batch_size=4, progress=False
    )
    assert [c.token_ids for c in other[0][1:]] != [c.token_ids for c in drawn[0][1:]]
    # Beam search does not depend on the seed.
    assert [cs[0] for cs in other] == [cs[0] for cs in drawn]


def test_a_prompts_candidates_do_not_depend_on_its_batch(
    llm: LocalChatModel, drawn: list[list[Candidate]]
) -> None:
    alone = llm.sample_candidates(PROMPTS[1:2], recipe=SMALL_RECIPE, seed=0, progress=False)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in drawn[1]]
    shuffled = [PROMPTS[3], PROMPTS[1], "the dog and the cat", PROMPTS[0]]
    mixed = llm.sample_candidates(
        shuffled, recipe=SMALL_RECIPE, seed=0, batch_size=3, progress=False
    )
    for got, want in ((mixed[0], drawn[3]), (mixed[1], drawn[1]), (mixed[3], drawn[0])):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.sum_logprob for c in got] == pytest.approx(
            [c.sum_logprob for c in want], abs=1e-9
        )


def test_top_k_one_and_tiny_top_p_sample_the_greedy_answer(llm: LocalChatModel) -> None:
    recipe = SamplingRecipe(
        strategies=(
            SamplingStrategy(method="greedy"),
            SamplingStrategy(n=2, top_k=1),
            SamplingStrategy(n=2, top_p=1e-6),
            SamplingStrategy(n=2, temperature=1e-4),
        ),
        max_new_tokens=8,
    )
    for candidates in llm.sample_candidates(PROMPTS, recipe=recipe, progress=False):
        assert len({c.token_ids for c in candidates}) == 1
    greedy = llm.generate(PROMPTS, max_new_tokens=8)
    drawn = llm.sample_candidates(PROMPTS, recipe=recipe, progress=False)
    assert [cs[0].text for cs in drawn] == greedy


def test_sampling_follows_the_model_distribution(llm: LocalChatModel) -> None:
    # One token per draw, many draws: the empirical first-token frequencies match softmax(logits).
    recipe = SamplingRecipe(strategies=(SamplingStrategy(n=400),), max_new_tokens=1)
    prompt = PROMPTS[0]
    (candidates,) = llm.sample_candidates([prompt], recipe=recipe, progress=False)
    ids = torch.tensor([_prompt_ids(llm, prompt)])
    with torch.inference_mode():
        probs = torch.softmax(llm.model(input_ids=ids).logits[0, -1].double(), dim=-1)
    top = int(probs.argmax())
    share = sum(c.token_ids[0] == top for c in candidates) / len(candidates)
    assert share == pytest.approx(float(probs[top]), abs=0.08)
    for c in candidates:
        assert c.sum_logprob == pytest.approx(math.log(float(probs[c.token_ids[0]])), abs=1e-5)


# --------------------------------------------------------------------------- likelihood


def test_log_likelihood_matches_an_unpadded_forward_pass(llm: LocalChatModel) -> None:
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    continuations = ["paris", "lyon is the city", "three", "on the mat"]
    for batch_size in (1, 3, 16):
        got = llm.log_likelihood(prompts, continuations, batch_size=batch_size)
        for prompt, text, (total, mean, n) in zip(prompts, continuations, got, strict=True):
            tokens = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
            expected = _manual_logprobs(llm, _prompt_ids(llm, prompt), tokens)
            assert n == len(tokens)
            assert total == pytest.approx(sum(expected), abs=1e-9)
            assert mean == pytest.approx(sum(expected) / len(tokens), abs=1e-9)


def test_log_likelihood_end_of_turn_and_empty_continuations(llm: LocalChatModel) -> None:
    (plain, empty), (with_stop, empty_stop) = (
        llm.log_likelihood([PROMPTS[0]] * 2, ["paris", ""]),
        llm.log_likelihood([PROMPTS[0]] * 2, ["paris", ""], end_of_turn=True),
    )
    assert empty == (0.0, float("-inf"), 0)
    assert with_stop[2] == plain[2] + 1 and with_stop[0] < plain[0]
    assert empty_stop[2] == 1 and empty_stop[0] == empty_stop[1] < 0


def test_finished_candidate_logprob_equals_log_likelihood_of_its_text_with_end_of_turn(
    llm: LocalChatModel, drawn: list[list[Candidate]]
) -> None:
    checked = 0
    for prompt, candidates in zip(PROMPTS, drawn, strict=True):
        for c in candidates:
            tokens = llm.tokenizer(c.text, add_special_tokens=False)["input_ids"]
            if not c.finished or tuple(tokens) + llm.eos_token_ids != c.token_ids:
                continue  # retokenising the text gives other tokens; nothing to compare
            ((total, _, n),) = llm.log_likelihood([prompt], [c.text], end_of_turn=True)
            assert (total, n) == (pytest.approx(c.sum_logprob, abs=1e-5), c.n_tokens)
            checked += 1
    assert checked > 0


# ------------------------------------------------------------------------------ generate


def test_generate_is_greedy_and_batch_size_invariant(llm: LocalChatModel) -> None:
    one = llm.generate(PROMPTS, max_new_tokens=6, batch_size=1)
    many = llm.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    assert one == many
    assert all(isinstance(a, str) and a == a.strip() for a in one)
    sampled = llm.generate(PROMPTS, max_new_tokens=6, do_sample=True, top_k=0, seed=3)
    assert sampled == llm.generate(PROMPTS, max_new_tokens=6, do_sample=True, top_k=0, seed=3)
    assert sampled != one


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        ([], ValueError, "non-empty"),
        ("What is the capital?", TypeError, "wrap it"),
        (["ok", None], TypeError, r"prompts\[1\]"),
        (["ok", 3], TypeError, r"prompts\[1\]"),
        ([{"role": "user", "content": "hi"}], TypeError, r"prompts\[0\].*wrap"),
        (["ok", []], ValueError, r"prompts\[1\]"),
    ],
)
def test_bad_prompts_are_refused_at_the_boundary(
    llm: LocalChatModel, prompts, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        llm.sample_candidates(prompts, recipe=SMALL_RECIPE, progress=False)
    with pytest.raises(error, match=match):
        llm.generate(prompts)


def test_bad_options_are_refused(llm: LocalChatModel) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        llm.sample_candidates(PROMPTS, recipe=SMALL_RECIPE, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="recipe"):
        llm.sample_candidates(PROMPTS, recipe={"n": 4}, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one to one"):
        llm.log_likelihood(PROMPTS, ["a"])
    with pytest.raises(TypeError, match=r"continuations\[0\]"):
        llm.log_likelihood(PROMPTS[:1], [None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(TypeError, match="num_return_sequences"):
        llm.generate(PROMPTS, num_return_sequences=2)


def test_one_sampled_candidate_streams_its_tokens_as_they_are_drawn(llm: LocalChatModel) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.steps: list[list[int]] = []
            self.ended = False

        def put(self, value) -> None:
            self.steps.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.ended = True

    one = SamplingRecipe(strategies=(SamplingStrategy(n=1, temperature=0.9),), max_new_tokens=6)
    recorder = Recorder()
    (drawn,) = llm.sample_candidates(
        PROMPTS[:1], recipe=one, seed=3, progress=False, streamer=recorder
    )
    (plain,) = llm.sample_candidates(PROMPTS[:1], recipe=one, seed=3, progress=False)
    assert recorder.ended and drawn[0].text == plain[0].text  # streaming changes nothing
    streamed = [t for step in recorder.steps[1:] for t in step]  # the first put is the prompt
    assert streamed[: len(drawn[0].token_ids)] == list(drawn[0].token_ids)
    with pytest.raises(ValueError, match="one prompt and a recipe of one sampled candidate"):
        llm.sample_candidates(PROMPTS[:2], recipe=one, progress=False, streamer=recorder)
