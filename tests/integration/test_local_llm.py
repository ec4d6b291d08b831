"""The packaged SmolLM2-135M-Instruct as a LocalChatModel: real candidates and likelihoods."""

from __future__ import annotations

import pytest

from capplug.llms import CAPPY_RECIPE, LocalChatModel, SamplingRecipe

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Q: Is the following sentence plausible? 'The goalkeeper scored a touchdown.'\nA:",
]
# Cappy's strategies with shorter candidates, to keep the test quick on two CPU cores.
SHORT_RECIPE = SamplingRecipe(strategies=CAPPY_RECIPE.strategies, max_new_tokens=12)


@pytest.fixture(scope="module")
def smollm() -> LocalChatModel:
    return LocalChatModel.from_pretrained("smollm2-135m-instruct", device="cpu")


def test_renders_the_smollm2_chat_template(smollm: LocalChatModel) -> None:
    text = smollm.render(PROMPTS[0])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_cappy_candidates_are_reproducible_and_scored(smollm: LocalChatModel) -> None:
    first = smollm.sample_candidates(PROMPTS, recipe=SHORT_RECIPE, seed=0, progress=False)
    assert [len(cs) for cs in first] == [17, 17]
    assert [c.strategy for c in first[0]][:2] == ["beam4", "sample"]
    assert "Paris" in first[0][0].text  # the beam-search answer
    for candidates in first:
        assert len({c.text for c in candidates}) > 3  # sampling gives varied answers
        for c in candidates:
            assert c.sum_logprob < 0 and 1 <= c.n_tokens <= 12
    again = smollm.sample_candidates(PROMPTS, recipe=SHORT_RECIPE, seed=0, progress=False)
    assert again == first
    # Self-scoring sees the model's own preferences: the beam output is among the likeliest.
    means = sorted((c.mean_logprob for c in first[0]), reverse=True)
    assert first[0][0].mean_logprob >= means[3]


def test_candidate_logprobs_agree_with_log_likelihood(smollm: LocalChatModel) -> None:
    (candidates,) = smollm.sample_candidates(PROMPTS[:1], recipe=SHORT_RECIPE, progress=False)
    finished = [c for c in candidates if c.finished][:4]
    assert finished
    scores = smollm.log_likelihood(
        [PROMPTS[0]] * len(finished), [c.text for c in finished], end_of_turn=True
    )
    for c, (total, _, n) in zip(finished, scores, strict=True):
        if n == c.n_tokens:  # the decoded text re-tokenises to the same tokens
            assert total == pytest.approx(c.sum_logprob, abs=1e-2)


def test_log_likelihood_prefers_the_right_answer(smollm: LocalChatModel) -> None:
    options = ["The capital of France is Paris.", "The capital of France is London."]
    (paris, london) = smollm.log_likelihood([PROMPTS[0]] * 2, options)
    assert paris[0] > london[0] and paris[1] > london[1]
    assert paris[2] == london[2] > 3


def test_generate_answers_greedily(smollm: LocalChatModel) -> None:
    answers = smollm.generate(PROMPTS, max_new_tokens=12)
    assert "Paris" in answers[0]
    assert answers == smollm.generate(PROMPTS, max_new_tokens=12, batch_size=1)
