"""The BIG-bench reader, against a tiny fake sdist built in a temporary folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from capplug.data import (
    BigBenchArchiveError,
    DataError,
    Pool,
    bigbench,
    is_test_example,
    parse_task,
)
from capplug.data.bigbench import extract_tasks

NI_TASK = "natural_instructions/subtask043_essential_terms_answering_incomplete_questions"


def load_task(name: str, *, archive: Path) -> Any:
    """A task of the sdist, read through a pool over the archive as a user's --data would."""
    return Pool(archive).load(name)


FAKE_TASKS: dict[str, dict[str, Any]] = {
    # A container task: BIG-bench keeps subtasks in folders below it.
    "arithmetic": {"name": "arithmetic", "description": "container", "keywords": []},
    "arithmetic/1_digit_addition": {
        "name": "1_digit_addition",
        "description": "1-digit addition.",
        "keywords": ["arithmetic"],
        "metrics": ["exact_str_match", "multiple_choice_grade"],
        "preferred_score": "exact_str_match",
        "examples": [
            {
                "input": "What is 1 plus 1?",
                "target": "2",
                "target_scores": {"2": 1, "3": 0, "x": 0},
            },
            {"input": "What is 2 plus 2?", "target": "4", "target_scores": {"4": 1, "5": 0}},
        ],
    },
    "anachronisms": {
        "name": "anachronisms",
        "description": "Identify anachronisms",
        "keywords": [],
        "metrics": ["multiple_choice_grade"],
        "preferred_score": "multiple_choice_grade",
        "task_prefix": "Read this.\n",
        "example_input_prefix": "\nSentence: ",
        "example_output_prefix": "\nAnachronism? ",
        "append_choices_to_input": False,
        "examples": [
            {"input": "Caesar used a phone.", "target_scores": {"Yes": 1, "No": 0}},
            {"input": "Caesar used a sword.", "target_scores": {"Yes": 0, "No": 1}},
        ],
    },
    "qa_wikidata": {
        "name": "qa_wikidata",
        "description": "Answer prompts",
        "keywords": [],
        "metrics": ["rouge"],
        "preferred_score": "rougeLsum",
        "example_input_prefix": "\n",
        "example_output_prefix": " ",
        "examples": [
            {"input": "The capital of France is", "target": ["Paris", "paris"]},
            {"input": "The capital of Spain is", "target": "Madrid", "comment": "c1"},
            {"input": "The capital of Spain is", "target": "Madrid", "comment": "c1"},
            {"input": "The capital of Italy is", "target": "Rome"},
        ],
    },
    NI_TASK: {
        "name": "subtask043",
        "description": "Definition: answer",
        "keywords": [],
        "metrics": ["rouge"],
        "preferred_score": "rougeLsum",
        "task_prefix": "Definition: Answer with A-E.",
        "examples": [{"input": "Question: *** (A) x (B) y", "target": ["E."]}],
    },
    # Stands in for a reserved task: it is in neither list and must never be extracted.
    "zz_invented_unlisted_task": {
        "name": "zz",
        "description": "unlisted",
        "keywords": [],
        "metrics": ["rouge"],
        "preferred_score": "rougeLsum",
        "examples": [{"input": "q", "target": "a"}],
    },
}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def build_archive(path: Path, tasks: dict[str, dict[str, Any]] = FAKE_TASKS) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/bigbench/api/json_task.py", b"# not read\n")
        for name, data in tasks.items():
            member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"
            _add(tar, member, json.dumps(data).encode())
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def archive(tmp_path: Path, home: Path) -> Path:
    return build_archive(tmp_path / "bigbench-1.0.0.tar.gz")


def test_default_prefixes_and_appended_choices(archive: Path) -> None:
    task = load_task("arithmetic/1_digit_addition", archive=archive)
    first, second = task.examples
    # BIG-bench: a fresh RandomState(42) permutes the sorted options; 3 options stay a,b,c
    # order and 2 options swap.
    assert first.prompt == "\nQ: What is 1 plus 1?\n  choice: 2\n  choice: 3\n  choice: x\nA: "
    assert second.prompt == "\nQ: What is 2 plus 2?\n  choice: 5\n  choice: 4\nA: "
    assert first.targets == ["2"]
    assert first.target_scores == {"2": 1.0, "3": 0.0, "x": 0.0}
    assert task.is_multiple_choice and task.is_generative
    assert task.instruction == "1-digit addition."  # no task_prefix: the description


def test_task_prefixes_without_appended_choices(archive: Path) -> None:
    task = load_task("anachronisms", archive=archive)
    example = task.examples[0]
    assert example.prompt == "Read this.\n\nSentence: Caesar used a phone.\nAnachronism? "
    # Pure multiple choice: the reference is the top-scored option.
    assert [e.targets for e in task.examples] == [["Yes"], ["No"]]
    assert not task.is_generative


def test_generative_targets_duplicates_and_metadata(archive: Path) -> None:
    task = load_task("qa_wikidata", archive=archive)
    assert [e.index for e in task.examples] == [0, 1, 3]  # exact duplicate 2 dropped
    assert task.dropped == 1
    assert task.examples[0].targets == ["Paris", "paris"]
    assert task.examples[1].targets == ["Madrid"]
    assert task.examples[1].metadata == {"comment": "c1"}
    assert task.examples[0].prompt == "\nThe capital of France is "
    assert task.examples[0].target_scores is None


def test_natural_instructions_definition_is_separable(archive: Path) -> None:
    task = load_task(NI_TASK, archive=archive)
    example = task.examples[0]
    assert task.name == "bigbench/" + NI_TASK and task.split == "dev"
    assert task.instruction == task.definition == "Definition: Answer with A-E."
    assert example.prompt == task.definition + "\nQ: Question: *** (A) x (B) y\nA: "


def test_stringly_false_append_choices_is_truthy_as_in_bigbench() -> None:
    data = {
        "examples": [{"input": "q", "target": "a", "target_scores": {"a": 1, "b": 0}}],
        "append_choices_to_input": "false",
    }
    assert (
        parse_task("anachronisms", data).examples[0].prompt
        == "\nQ: q\n  choice: b\n  choice: a\nA: "
    )


def test_choice_prefix_is_honoured() -> None:
    data = {
        "choice_prefix": "\n - ",
        "examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}],
    }
    assert parse_task("anachronisms", data).examples[0].prompt == "\nQ: q\n - b\n - a\nA: "


def test_split_rule_matches_hand_computed_sha1() -> None:
    # sha1("tense\nShe had applied for the job.") = 04b2865e...c2; as an integer, mod 10 = 6.
    assert not is_test_example("tense", "She had applied for the job.")
    # sha1("anachronisms\nA") = 5cf2f689...42; mod 10 = 2, so a test example.
    assert is_test_example("anachronisms", "A")
    assert int("5cf2f68998f87a0bda3b382f259dc12e56be7042", 16) % 10 == 2
    assert int("04b2865eb83e2d8959a67acd94e3a8aff4afb9c2", 16) % 10 == 6


def test_task_split_partitions_examples(archive: Path) -> None:
    task = load_task("qa_wikidata", archive=archive)
    test, train = task.split_examples("test"), task.split_examples("train")
    assert sorted(e.index for e in test + train) == [e.index for e in task.examples]
    assert all(is_test_example("bigbench/qa_wikidata", e.input) for e in test)
    with pytest.raises(ValueError, match="part must be"):
        task.split_examples("dev")  # type: ignore[arg-type]


def test_extraction_happens_once_and_is_reused(
    archive: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = bigbench._extract_archive

    def counting(path: Path, wanted: frozenset[str], out: Path) -> set[str]:
        calls.append(path)
        return real(path, wanted, out)

    monkeypatch.setattr(bigbench, "_extract_archive", counting)
    folder = extract_tasks(archive=archive)
    load_task("anachronisms", archive=archive)
    load_task("qa_wikidata", archive=archive)
    assert len(calls) == 1
    assert folder.is_relative_to(home)
    extracted = sorted(
        p.parent.relative_to(folder / "tasks").as_posix() for p in folder.rglob("task.json")
    )
    # Listed tasks only: neither the container nor the unlisted task is copied out.
    assert extracted == sorted(
        ["anachronisms", "arithmetic/1_digit_addition", NI_TASK, "qa_wikidata"]
    )


def test_default_archive_is_fetched_with_pinned_hash(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = build_archive(tmp_path / "fetched.tar.gz")
    seen: list[tuple[str, str, str | None]] = []

    def fetch(package: str, version: str, *, sha256: str | None = None) -> Path:
        seen.append((package, version, sha256))
        return fake

    monkeypatch.setattr(bigbench, "download_distribution", fetch)
    folder = extract_tasks()
    assert (folder / "tasks" / "anachronisms" / "task.json").is_file()
    extract_tasks()
    assert seen == [("bigbench", "1.0.0", bigbench.BIGBENCH_SHA256)]


def test_unlisted_task_is_never_read(archive: Path) -> None:
    pool = Pool(archive)
    assert "bigbench/zz_invented_unlisted_task" not in pool.names(None)
    with pytest.raises(KeyError, match="no task 'zz_invented_unlisted_task'"):
        pool.load("zz_invented_unlisted_task")


def test_sdist_splits_come_from_the_packaged_lists(archive: Path) -> None:
    pool = Pool(archive)
    assert pool.names("train") == [
        "bigbench/anachronisms",
        "bigbench/arithmetic/1_digit_addition",
    ]
    assert "bigbench/qa_wikidata" in pool.names("dev", benchmark="rerank_generation")


def test_listed_task_missing_from_archive(tmp_path: Path, home: Path) -> None:
    small = build_archive(tmp_path / "small.tar.gz", {"anachronisms": FAKE_TASKS["anachronisms"]})
    with pytest.raises(KeyError, match="no task 'qa_wikidata'"):
        load_task("qa_wikidata", archive=small)


@pytest.mark.parametrize("payload", [b"this is not a tarball", None])
def test_corrupt_archive_is_reported(tmp_path: Path, home: Path, payload: bytes | None) -> None:
    bad = tmp_path / "bad.tar.gz"
    if payload is None:  # a truncated download
        good = build_archive(tmp_path / "good.tar.gz").read_bytes()
        payload = good[: len(good) // 2]
    bad.write_bytes(payload)
    with pytest.raises(
        BigBenchArchiveError, match=r"bad\.tar\.gz is not a readable BIG-bench sdist"
    ):
        load_task("anachronisms", archive=bad)
    assert not any(home.rglob("manifest.json"))  # nothing half-extracted is left as done


def test_missing_archive_path(tmp_path: Path, home: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.tar\.gz"):
        load_task("anachronisms", archive=tmp_path / "nope.tar.gz")


def test_example_without_target_is_rejected() -> None:
    with pytest.raises(DataError, match="example 0: has neither 'target' nor 'target_scores'"):
        parse_task("anachronisms", {"examples": [{"input": "q"}]})
