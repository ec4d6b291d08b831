"""The data build: balanced, capped, labelled shards, resumable, refusing mixed settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bigbench_fakes import GEN_TASK, MC_TASK, fake_loader
from task_files import write_pool

from capplug.data.build import BuildConfig, build_dataset, clip_build, merge_builds


class EchoSource:
    name = "echo"

    def candidates(self, prompts):
        return [[(p[-6:], "echo"), ("answer 1", "echo"), ("answer 1", "echo")] for p in prompts]


def _number(prompt: str) -> str:
    return re.search(r"q(\d+)", prompt).group(1)  # type: ignore[union-attr]


class RamblingSource:
    name = "rambling"

    def candidates(self, prompts):
        return [
            [(f"answer {_number(p)}.\nAnd then a long story follows.", "beam4"), ("no idea", "s")]
            for p in prompts
        ]


def read(out: Path, task: str) -> list[dict]:
    return pq.read_table(out / "shards" / f"{task.replace('/', '__')}.parquet").to_pylist()


def test_rows_are_capped_per_task_and_per_example(tmp_path: Path) -> None:
    calls: list[str] = []
    config = BuildConfig(max_per_task=10, max_options=4)
    result = build_dataset(
        tmp_path / "b",
        config=config,
        tasks=[MC_TASK, GEN_TASK],
        progress=False,
        task_loader=fake_loader(calls),
    )
    assert result.shards_written == 2
    rows = read(tmp_path / "b", MC_TASK)
    examples = {r["example_id"] for r in rows}
    assert len(examples) == 10
    for example in examples:
        mine = [r for r in rows if r["example_id"] == example]
        assert sum(r["source"] == "gold" and r["label"] == 1.0 for r in mine) == 1
        assert sum(r["source"] == "negative" and r["label"] == 0.0 for r in mine) == 1
        assert sum(r["source"] == "option" for r in mine) == 4
    assert {r["task"] for r in rows} == {MC_TASK}
    assert all(0.0 <= r["label"] <= 1.0 for r in rows)


def test_a_rerun_skips_finished_shards_and_other_settings_are_refused(tmp_path: Path) -> None:
    calls: list[str] = []
    out = tmp_path / "b"
    build_dataset(out, tasks=[MC_TASK], progress=False, task_loader=fake_loader(calls))
    result = build_dataset(
        out, tasks=[MC_TASK, GEN_TASK], progress=False, task_loader=fake_loader(calls)
    )
    assert calls == [MC_TASK, GEN_TASK]  # the first task was not loaded again
    assert (result.shards_written, result.shards_skipped) == (1, 1)
    with pytest.raises(ValueError, match="other settings"):
        build_dataset(
            out,
            config=BuildConfig(max_per_task=3),
            tasks=[MC_TASK],
            progress=False,
            task_loader=fake_loader(calls),
        )


def test_sampled_candidates_are_deduplicated_and_labelled_by_rouge(tmp_path: Path) -> None:
    build_dataset(
        tmp_path / "b",
        source=EchoSource(),
        tasks=[GEN_TASK],
        progress=False,
        task_loader=fake_loader([]),
    )
    rows = read(tmp_path / "b", GEN_TASK)
    sampled = [r for r in rows if r["source"] == "sampled"]
    assert sampled and all(r["generator"] == "echo" for r in sampled)
    first = [r for r in sampled if r["example_id"] == 1]
    assert [r["response"] for r in first].count("answer 1") == 1
    assert max(r["label"] for r in first) == 1.0


def test_only_train_tasks_are_built(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", dev=("bigbench/anachronisms",))
    with pytest.raises(ValueError, match="bigbench/anachronisms is a dev task"):
        build_dataset(tmp_path / "b", tasks=["anachronisms"], data=pool, progress=False)
    with pytest.raises(ValueError, match="no task 'nothing'"):
        build_dataset(tmp_path / "b", tasks=["nothing"], data=pool, progress=False)
    with pytest.raises(ValueError, match="split must be 'train'"):
        build_dataset(tmp_path / "b", config=BuildConfig(split="dev"), progress=False)  # type: ignore[arg-type]


def test_sampling_can_be_capped_per_task_and_old_builds_still_resume(tmp_path: Path) -> None:
    import json

    def ids_by_source(folder: str, **settings: int) -> dict[str, set[int]]:
        build_dataset(
            tmp_path / folder,
            config=BuildConfig(max_per_task=4, **settings),
            source=EchoSource(),
            tasks=[GEN_TASK],
            progress=False,
            task_loader=fake_loader([]),
        )
        ids: dict[str, set[int]] = {}
        for r in read(tmp_path / folder, GEN_TASK):
            ids.setdefault(r["source"], set()).add(r["example_id"])
        return ids

    first = ids_by_source("b", sample_per_task=2)
    assert len(first["sampled"]) == 2 and len(first["gold"]) == 4
    assert first["sampled"] < first["gold"]

    # a second build that skips the first two samples the other two drawn examples
    second = ids_by_source("b2", sample_per_task=2, sample_skip=2)
    assert second["gold"] == first["gold"]
    assert second["sampled"] == first["gold"] - first["sampled"]
    with pytest.raises(ValueError, match="sample_skip must be >= 0"):
        build_dataset(tmp_path / "b3", config=BuildConfig(sample_skip=-1), progress=False)

    # a build.json written before sample_per_task existed resumes with the default
    state_file = tmp_path / "c" / "build.json"
    build_dataset(tmp_path / "c", tasks=[GEN_TASK], progress=False, task_loader=fake_loader([]))
    state = json.loads(state_file.read_text())
    del state["config"]["sample_per_task"], state["config"]["sample_skip"]
    state_file.write_text(json.dumps(state))
    calls: list[str] = []
    result = build_dataset(
        tmp_path / "c", tasks=[GEN_TASK], progress=False, task_loader=fake_loader(calls)
    )
    assert result.shards_skipped == 1 and calls == []


def test_clipped_candidates_in_a_build_or_added_to_a_finished_one_are_the_same(
    tmp_path: Path,
) -> None:
    def build(folder: str, clip: bool) -> list[dict]:
        build_dataset(
            tmp_path / folder,
            config=BuildConfig(clip_candidates=clip),
            source=RamblingSource(),
            tasks=[GEN_TASK],
            progress=False,
            task_loader=fake_loader([]),
        )
        return read(tmp_path / folder, GEN_TASK)

    plain, clipped = build("plain", False), build("clipped", True)
    short = [r for r in clipped if r["source"] == "clipped"]
    assert [r["response"] for r in short] == [f"answer {i}." for i in range(5)]
    assert all(r["label"] == 1.0 and r["generator"] == "beam4+first_line" for r in short)
    long = [r for r in plain if r["source"] == "sampled" and r["response"] != "no idea"]
    assert len(long) == 5 and all(r["label"] < 0.5 for r in long)  # the drift costs Rouge-L
    assert [r for r in clipped if r["source"] != "clipped"] == plain

    result = clip_build(tmp_path / "plain", tmp_path / "derived", progress=False)
    assert (result.shards_written, result.rows) == (1, len(clipped))
    key = lambda r: (r["example_id"], r["source"], r["response"])  # noqa: E731
    derived = read(tmp_path / "derived", GEN_TASK)
    assert sorted(derived, key=key) == sorted(clipped, key=key)
    # same settings as a clipped build: it resumes as one, and a second run skips the shard
    assert clip_build(tmp_path / "plain", tmp_path / "derived", progress=False).shards_skipped == 1
    build_dataset(
        tmp_path / "derived",
        config=BuildConfig(clip_candidates=True),
        source=RamblingSource(),
        tasks=[GEN_TASK],
        progress=False,
        task_loader=fake_loader([]),
    )


def test_clipping_refuses_builds_it_cannot_clip(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"holds no build\.json"):
        clip_build(tmp_path / "missing", tmp_path / "out", progress=False)
    build_dataset(tmp_path / "refs", tasks=[GEN_TASK], progress=False, task_loader=fake_loader([]))
    with pytest.raises(ValueError, match="without --generator"):
        clip_build(tmp_path / "refs", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="must differ"):
        clip_build(tmp_path / "refs", tmp_path / "refs", progress=False)


def test_the_clip_command_adds_clipped_rows_and_reports_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capplug.cli import main

    build_dataset(
        tmp_path / "b",
        source=RamblingSource(),
        tasks=[GEN_TASK],
        progress=False,
        task_loader=fake_loader([]),
    )
    before = (tmp_path / "b" / "build.json").read_text()
    assert main(["data", "clip", str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    assert "1 written" in capsys.readouterr().out
    assert sum(r["source"] == "clipped" for r in read(tmp_path / "c", GEN_TASK)) == 5
    assert (tmp_path / "b" / "build.json").read_text() == before  # the source is only read

    assert main(["data", "clip", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2
    assert "holds no build.json" in capsys.readouterr().err
    assert main(["data", "build", "--out", str(tmp_path / "e"), "--clip-candidates"]) == 2
    assert "--clip-candidates needs --generator" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_merged_builds_keep_every_row_once_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capplug.cli import main

    def build(folder: str, source, **settings: int) -> list[dict]:
        build_dataset(
            tmp_path / folder,
            config=BuildConfig(max_per_task=4, sample_per_task=2, **settings),
            source=source,
            tasks=[GEN_TASK],
            progress=False,
            task_loader=fake_loader([]),
        )
        return read(tmp_path / folder, GEN_TASK)

    first, second = build("a", EchoSource()), build("b", RamblingSource(), sample_skip=2)
    merge = [
        "data",
        "merge",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(merge) == 0
    assert "1 written" in capsys.readouterr().out
    merged = read(tmp_path / "m", GEN_TASK)
    key = lambda r: (r["example_id"], r["source"], r["response"])  # noqa: E731
    assert len({key(r) for r in merged}) == len(merged)  # every row once
    assert {key(r) for r in merged} == {key(r) for r in first} | {key(r) for r in second}
    assert sum(r["source"] == "gold" for r in merged) == 4  # shared references not doubled
    assert {r["generator"] for r in merged if r["source"] == "sampled"} == {"echo", "beam4", "s"}

    # a rerun skips the shard; other sources into the same folder are refused
    assert main(merge) == 0
    assert "1 already there" in capsys.readouterr().out
    with pytest.raises(ValueError, match="another build or merge"):
        merge_builds([tmp_path / "b", tmp_path / "a"], tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="at least two"):
        merge_builds([tmp_path / "a"], tmp_path / "n", progress=False)
    with pytest.raises(ValueError, match="clip each build, then merge"):
        clip_build(tmp_path / "m", tmp_path / "mc", progress=False)


def test_every_train_task_of_the_pool_is_built_and_a_bad_one_skipped(tmp_path: Path) -> None:
    root = write_pool(tmp_path / "pool", manifest=False)
    (root / "bbh" / "broken.json").write_text('{"examples": [')
    result = build_dataset(tmp_path / "b", data=root, progress=False)
    assert result.shards_written == 8  # one per format's task; the truncated file is skipped
    rows = read(tmp_path / "b", "p3/imdb_is_positive")
    assert {r["source"] for r in rows} == {"gold", "negative", "option"}
    assert not (tmp_path / "b" / "shards" / "bbh__broken.parquet").exists()
    again = build_dataset(tmp_path / "b", data=root, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 8)


def test_a_family_cap_is_shared_among_its_tasks(tmp_path: Path) -> None:
    root = write_pool(tmp_path / "pool", manifest=False)
    for i in range(4):  # four more subtasks of one dataset, 10 examples each
        sub = root / "bigbench" / "arithmetic" / f"{i}_digit_subtraction" / "task.json"
        sub.parent.mkdir(parents=True)
        examples = [{"input": f"{i}: {j} minus 1?", "target": str(j - 1)} for j in range(10)]
        sub.write_text(json.dumps({"examples": examples}))
    config = BuildConfig(max_per_task=8, max_per_family=10)
    build_dataset(tmp_path / "b", config=config, data=root, progress=False)
    drawn = {
        name: len({r["example_id"] for r in read(tmp_path / "b", name)})
        for name in [f"bigbench/arithmetic/{i}_digit_subtraction" for i in range(4)]
    }
    assert drawn == dict.fromkeys(drawn, 2)  # 10 over 5 arithmetic tasks
    assert len({r["example_id"] for r in read(tmp_path / "b", "bbh/boolean_expressions")}) == 6
    # a cap draws the start of the uncapped draw
    build_dataset(tmp_path / "c", config=BuildConfig(max_per_task=8), data=root, progress=False)
    name = "bigbench/arithmetic/0_digit_subtraction"
    capped = {r["example_id"] for r in read(tmp_path / "b", name)}
    assert capped <= {r["example_id"] for r in read(tmp_path / "c", name)}


def test_a_fold_left_out_of_a_build_is_every_task_of_its_families(tmp_path: Path, capsys) -> None:
    from capplug.cli import main
    from capplug.data import open_pool

    root = write_pool(tmp_path / "pool", manifest=False)
    folds = open_pool(root).folds(2)
    out = tmp_path / "b"
    argv = ["data", "build", "--out", str(out), "--data", str(root), "--folds", "2"]
    assert main([*argv, "--leave-out-fold", "1"]) == 0
    written = {p.stem.replace("__", "/") for p in (out / "shards").glob("*.parquet")}
    assert written == set(folds[0])
    assert main([*argv, "--leave-out-fold", "2"]) == 2
    assert "--leave-out-fold must be 0 to 1" in capsys.readouterr().err
