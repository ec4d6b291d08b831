"""Every format is read into the one task model, with prompts built the way its source builds
them."""

from __future__ import annotations

from pathlib import Path

import pytest
from task_files import write_jsonl_task, write_pool

from capplug.data import Pool, template_of
from capplug.data.formats.common import merge_families


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    return Pool(write_pool(tmp_path_factory.mktemp("pool")))


def test_bigbench_keeps_its_prefixes_choices_and_drops_duplicates(pool: Pool) -> None:
    task = pool.load("bigbench/anachronisms")
    assert (task.source, task.family, task.split) == ("bigbench", "anachronisms", "train")
    assert task.examples[0].prompt == (
        "Read this.\n\nQ: Caesar used a phone.\n  choice: Yes\n  choice: No\nA: "
    )
    assert task.instruction == "Read this."
    assert task.dropped == 1 and len(task.examples) == 2
    assert task.examples[1].options == ["Yes", "No"] and task.examples[1].correct == [False, True]
    assert task.examples[1].targets == ["No"]


def test_bigbench_subtask_is_named_by_its_path_and_grouped_by_its_parent(pool: Pool) -> None:
    task = pool.load("arithmetic/1_digit_addition")  # the bare name is enough when unique
    assert task.name == "bigbench/arithmetic/1_digit_addition"
    assert task.family == "arithmetic"
    assert task.examples[0].prompt == "\nQ: What is 0 plus 1?\nA: "
    assert task.is_generative and not task.is_multiple_choice


def test_bbh_options_come_from_the_input_or_the_label_set(pool: Pool) -> None:
    hyperbaton = pool.load("bbh/hyperbaton")
    first = hyperbaton.examples[0]
    assert first.options == ["(A)", "(B)"] and first.correct == [False, True]
    assert first.prompt.startswith("\nQ: Which is right?") and first.prompt.endswith("\nA: ")
    boolean = pool.load("bbh/boolean_expressions")
    assert boolean.is_multiple_choice
    assert sorted(boolean.examples[0].options) == ["False", "True"]
    assert boolean.instruction == ""


def test_natural_instructions_v1_definition_then_input(pool: Pool) -> None:
    task = pool.load("natural_instructions_v1/subtask046_question_typing")
    assert task.instruction == "Say whether the question asks about a person or a place"
    assert task.instructions[1] == "Say what the question asks for."
    example = task.examples[0]
    assert example.prompt == (
        "Definition: Say whether the question asks about a person or a place.\n\n"
        "Now complete the following example -\nInput: Where is 0?\nOutput: "
    )
    # the unanswered instance is left out; two labels over eight examples read as a choice
    assert task.dropped == 1 and len(task.examples) == 8
    assert task.is_multiple_choice and example.targets == ["place"]
    assert task.family == "question"


def test_super_natural_instructions_keeps_every_reference_and_its_source(pool: Pool) -> None:
    task = pool.load("super_natural_instructions/task1_ted_translation")
    assert task.family == "ted"
    assert task.examples[1].targets == ["Merci.", "Merci bien."]
    assert task.examples[1].metadata == {"id": "t1-2"}
    assert task.examples[0].prompt.startswith("Definition: Translate the sentence into French.\n")
    assert not task.is_multiple_choice


def test_p3_prompt_as_written_labels_as_options_template_as_instruction(pool: Pool) -> None:
    task = pool.load("p3/imdb_is_positive")
    example = task.examples[0]
    assert example.prompt == "Review: great film 0\nIs this review positive?\n"
    assert example.targets == ["Yes"]  # without <|endoftext|>
    assert task.dropped == 1  # the empty completion
    assert task.is_multiple_choice and set(example.options) == {"Yes", "No"}
    assert task.instruction == "Review: great film ... Is this review positive?"
    assert task.family == "imdb"


def test_instruction_induction_merges_its_three_files(pool: Pool) -> None:
    task = pool.load("instruction_induction/antonyms")
    assert task.instructions == ("Write the opposite word.", "Give an antonym.")
    assert [e.input for e in task.examples] == ["hot", "up", "big"]
    assert [e.metadata["part"] for e in task.examples] == ["induce", "execute", "execute"]
    # each example is prompted with the instructions in turn
    assert task.examples[0].prompt == "Write the opposite word.\n\nInput: hot\nOutput:"
    assert task.examples[1].prompt.startswith("Give an antonym.\n")


def test_users_own_jsonl(tmp_path: Path) -> None:
    write_jsonl_task(tmp_path / "capitals.jsonl")
    task = Pool(tmp_path).load("capitals")
    assert task.source == "jsonl" and task.instruction == "Name the capital."
    first, second = task.examples
    assert first.prompt == "Name the capital.\n\nFrance" and first.targets == ["Paris"]
    assert first.target_scores is None
    assert second.options == ["Sydney", "Canberra"] and second.correct == [False, True]
    assert second.targets == ["Canberra"]


def test_template_of_finds_the_shared_words() -> None:
    prompts = ["Summarise: a b c\nTL;DR:", "Summarise: d e\nTL;DR:"]
    assert template_of(prompts) == "Summarise: ... TL;DR:"
    assert template_of(["one", "two"]) == ""
    assert template_of(["only one prompt here"]) == ""


def test_families_of_one_dataset_merge_across_sources() -> None:
    merged = merge_families(
        {
            "bigbench/logical_deduction/three_objects": "logical_deduction",
            "bbh/logical_deduction_three_objects": "logical_deduction_three_objects",
            "bbh/formal_fallacies": "formal_fallacies",
            "bigbench/formal_fallacies_syllogisms_negation": "formal_fallacies_syllogisms_negation",
            "p3/imdb_x": "imdb",
        }
    )
    assert merged["bbh/logical_deduction_three_objects"] == "logical_deduction"
    assert merged["bigbench/formal_fallacies_syllogisms_negation"] == "formal_fallacies"
    assert merged["p3/imdb_x"] == "imdb"


def test_a_p3_input_is_what_the_prompt_adds_to_the_template(pool: Pool) -> None:
    task = pool.load("p3/imdb_is_positive")
    assert [e.input for e in task.examples[:2]] == ["0", "1"]
    assert task.examples[0].prompt == "Review: great film 0\nIs this review positive?\n"
