"""Finding task data, its splits and families, and what a user sees when it is missing or bad."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from task_files import write_jsonl_task, write_pool

from capplug.cli import main
from capplug.data import (
    DataError,
    NoDataError,
    Pool,
    is_test_example,
    load_task,
    open_pool,
    task_names,
)
from capplug.data.pool import DATA_ENV

EVERY_TASK = [
    "bbh/boolean_expressions",
    "bbh/hyperbaton",
    "bigbench/anachronisms",
    "bigbench/arithmetic/1_digit_addition",
    "instruction_induction/antonyms",
    "natural_instructions_v1/subtask046_question_typing",
    "p3/imdb_is_positive",
    "super_natural_instructions/task1_ted_translation",
]


@pytest.mark.parametrize("manifest", [True, False])
def test_every_format_is_found_with_or_without_a_manifest(tmp_path: Path, manifest: bool) -> None:
    pool = Pool(write_pool(tmp_path, manifest=manifest))
    assert pool.names(None) == EVERY_TASK
    assert pool.has_manifest is manifest
    assert all(pool.load(name).examples for name in EVERY_TASK)


def test_splits_come_from_the_manifest(tmp_path: Path) -> None:
    dev = ("natural_instructions_v1/subtask046_question_typing", "bigbench/anachronisms")
    pool = Pool(write_pool(tmp_path, dev=dev))
    assert pool.names("dev") == sorted(dev)
    assert set(pool.names("train")) == set(EVERY_TASK) - set(dev)
    assert pool.names("train", source="bbh") == ["bbh/boolean_expressions", "bbh/hyperbaton"]
    # a dev benchmark's list, as far as this pool has it
    assert pool.names("dev", benchmark="zero_shot_choice") == sorted(dev)
    assert pool.load("anachronisms").split == "dev"
    with pytest.raises(ValueError, match="split='dev' only"):
        pool.names("train", benchmark="zero_shot_choice")
    with pytest.raises(ValueError, match="split must be one of"):
        pool.names("test")  # type: ignore[arg-type]


def test_data_comes_from_the_argument_then_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = write_pool(tmp_path / "a"), tmp_path / "b"
    write_jsonl_task(b / "capitals.jsonl")
    monkeypatch.setenv(DATA_ENV, str(b))
    assert task_names("train") == ["capitals"]
    assert open_pool(a).root == a.resolve()
    assert load_task("hyperbaton", data=a).source == "bbh"
    assert open_pool(b / "capitals.jsonl").names(None) == ["capitals"]


def test_no_data_names_the_places_it_looked_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "absent"))
    monkeypatch.setattr("capplug.data.pool.data_paths", lambda data=None: [tmp_path / "absent"])
    with pytest.raises(NoDataError, match=r"looked in: .*absent.*CAPPLUG_DATA"):
        open_pool()
    with pytest.raises(NoDataError, match="no task data at"):
        open_pool(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoDataError, match="no task files in"):
        Pool(tmp_path / "empty")


def test_a_bare_name_must_be_unique(tmp_path: Path) -> None:
    root = write_pool(tmp_path, manifest=False)
    (root / "bbh" / "anachronisms.json").write_text(
        json.dumps({"examples": [{"input": "q", "target": "a"}]})
    )
    pool = Pool(root)
    with pytest.raises(KeyError, match="names several tasks"):
        pool.load("anachronisms")
    with pytest.raises(KeyError, match="no task 'nothing'"):
        pool.load("nothing")


BAD_FILES = {
    "truncated JSON": (
        "bbh/broken.json",
        '{"canary": "c", "examples": [{"input": "q", "ta',
        r"broken\.json: not valid JSON \(line 1",
    ),
    "a line that is no object": (
        "mine.jsonl",
        '{"instruction": "Say hi.", "references": ["hi"]}\n[1, 2]\n',
        r"mine\.jsonl, line 2: expected a JSON object; got list",
    ),
    "no references": (
        "natural_instructions_v1/subtask001_x.json",
        json.dumps({"Definition": "d", "Instances": [{"input": "q", "output": []}]}),
        r"subtask001_x\.json: none of its 1 examples has a reference",
    ),
    "a field of the wrong kind": (
        "natural_instructions_v1/subtask002_y.json",
        json.dumps({"Definition": "d", "Instances": [{"input": 3, "output": ["a"]}]}),
        r"subtask002_y\.json, Instances\[0\]: field 'input' must be str",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_named_and_the_good_ones_still_read(tmp_path: Path, case: str) -> None:
    relative, text, message = BAD_FILES[case]
    root = write_pool(tmp_path, manifest=False)
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_text(text)
    pool = Pool(root)
    summary = pool.summary()
    assert sum(c.tasks for c in summary.counts) == len(EVERY_TASK)
    assert len(summary.skipped) == 1
    path, why = summary.skipped[0]
    assert re.search(message, f"{path}: {why}"), (path, why)
    with pytest.raises(DataError, match=message):
        strict = Pool(root, strict=True)
        list(strict.tasks(split=None))


def test_a_changed_file_fails_its_manifest_sha256(tmp_path: Path) -> None:
    root = write_pool(tmp_path)
    path = root / "bbh" / "hyperbaton.json"
    path.write_text(path.read_text().replace("red", "pink"))
    with pytest.raises(DataError, match=r"hyperbaton\.json: its sha256 differs"):
        Pool(root).load("bbh/hyperbaton")


def test_a_manifest_row_for_a_missing_file_is_skipped(tmp_path: Path) -> None:
    root = write_pool(tmp_path)
    (root / "p3" / "imdb_is_positive.jsonl").unlink()
    pool = Pool(root)
    assert "p3/imdb_is_positive" not in pool.names(None)
    assert any("listed in the manifest but missing" in why for _, why in pool.skipped)


def test_summary_counts_sources_and_splits(tmp_path: Path) -> None:
    pool = Pool(write_pool(tmp_path, dev=("bigbench/anachronisms",)))
    summary = pool.summary()
    by = {(c.source, c.split): c for c in summary.counts}
    assert by[("bigbench", "dev")].tasks == 1 and by[("bigbench", "dev")].examples == 2
    assert by[("bigbench", "dev")].dropped == 1
    assert by[("instruction_induction", "train")].examples == 3
    assert by[("p3", "train")].examples == 6
    assert summary.families == len(EVERY_TASK)  # one dataset each
    text = summary.format()
    assert "natural_instructions_v1" in text and "dev" in text


def test_cli_data_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_pool(tmp_path / "pool")
    assert main(["data", "sources", "--data", str(root), "--json", "--tasks"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {s["source"] for s in out["sources"]} == {
        "bigbench",
        "bbh",
        "natural_instructions_v1",
        "super_natural_instructions",
        "p3",
        "instruction_induction",
    }
    assert [t["name"] for t in out["tasks"]] == EVERY_TASK
    assert main(["data", "sources", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no task data at" in err and len(err.strip().splitlines()) == 1


def test_folds_never_split_a_family(tmp_path: Path) -> None:
    root = write_pool(tmp_path, manifest=False)
    for i in range(3):  # three more subtasks of one dataset
        sub = root / "bigbench" / "arithmetic" / f"{i}_digit_subtraction" / "task.json"
        sub.parent.mkdir(parents=True)
        sub.write_text(json.dumps({"examples": [{"input": "q", "target": "a"}]}))
    pool = Pool(root)
    folds = pool.folds(3)
    assert sorted(n for fold in folds for n in fold) == pool.names("train")
    homes = {pool.family(n): i for i, fold in enumerate(folds) for n in fold}
    assert all(homes[pool.family(n)] == i for i, fold in enumerate(folds) for n in fold)
    assert any(len(fold) == 4 and all("arithmetic" in n for n in fold) for fold in folds)
    assert pool.folds(3) == folds  # the same seed, the same folds
    with pytest.raises(ValueError, match="cannot fill 20 folds"):
        pool.folds(20)


def test_a_dev_benchmark_list_falls_back_only_for_a_pool_without_the_lists(
    tmp_path: Path,
) -> None:
    own = Pool(write_pool(tmp_path / "own", dev=("bigbench/anachronisms",)))
    # none of the lists' tasks: the pool's own dev tasks stand in for every list
    assert own.names("dev", benchmark="rerank_generation") == ["bigbench/anachronisms"]
    root = tmp_path / "listed"
    task = root / "bigbench" / "winowhy" / "task.json"
    task.parent.mkdir(parents=True)
    task.write_text(json.dumps({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}]}))
    rows = [{"path": "bigbench/winowhy/task.json", "split": "dev"}]
    (root / "manifest.json").write_text(json.dumps({"tasks": rows}))
    listed = Pool(root)
    assert listed.names("dev", benchmark="zero_shot_choice") == ["bigbench/winowhy"]
    assert listed.names("dev", benchmark="rerank_generation") == []  # not winowhy


def test_the_example_split_hashes_the_original_names() -> None:
    assert is_test_example("bigbench/tense", "x") == is_test_example("tense", "x")
    for text in ("a", "b", "c", "d", "e", "f"):
        assert is_test_example("natural_instructions_v1/subtask043_x", text) == (
            is_test_example("natural_instructions/subtask043_x", text)
        )
