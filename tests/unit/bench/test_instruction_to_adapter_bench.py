"""benchmarks/instruction_to_adapter.py on a tiny random Llama and a small task pool of
made-up Natural Instructions tasks (two dev, two train)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from bench_pool import ni_task, write_pool

from capplug.data import Task, is_test_example, open_pool
from capplug.testing import save_tiny_llama, save_tiny_scorer

WORDS = "the cat dog sat mat sky blue red one two three river city".split()
DEV = [
    "natural_instructions_v1/subtask043_essential_terms_answering_incomplete_questions",
    "natural_instructions_v1/subtask044_essential_terms_identifying_essential_words",
]
TRAIN = ["natural_instructions_v1/subtask900_toy_no", "natural_instructions_v1/subtask901_toy_last"]


def tiny_config():
    from capplug.training import LoraTrainConfig

    return LoraTrainConfig(
        r=2,
        alpha=4,
        steps=2,
        batch_size=2,
        lr=1e-2,
        warmup_steps=0,
        max_length=64,
        max_answer_tokens=8,
        checkpoint_every=1,
        log_every=1,
        eval_examples=2,
    )


def toy_task(answer: Callable[[str], str], definition: str, count: int = 24) -> dict:
    texts = [
        f"{WORDS[i % 13]} {WORDS[(3 * i + 1) % 13]} {WORDS[(7 * i + 2) % 13]} {i}"
        for i in range(count)
    ]
    return ni_task(definition, [(text, answer(text)) for text in texts])


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("benchmarks.instruction_to_adapter")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bench"))


@pytest.fixture
def data(monkeypatch, tmp_path) -> Path:
    """The pool's folder; it is also $CAPPLUG_DATA, so training reads the same tasks."""
    root = write_pool(
        tmp_path / "data",
        {
            DEV[0]: ("dev", toy_task(lambda _: "yes", "Answer yes.")),
            DEV[1]: ("dev", toy_task(lambda s: s.split()[0], "Repeat the first word.")),
            TRAIN[0]: ("train", toy_task(lambda _: "no", "Answer no.")),
            TRAIN[1]: ("train", toy_task(lambda s: s.split()[-1], "Repeat the last word.")),
        },
    )
    monkeypatch.setenv("CAPPLUG_DATA", str(root))
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    return root


@pytest.fixture
def toys(data) -> dict[str, Task]:
    pool = open_pool(data)
    return {name: pool.load(name) for name in [*DEV, *TRAIN]}


@pytest.fixture
def hypernet_dir(base_dir, tmp_path) -> Path:
    from capplug.adapters import Hypernetwork

    hypernet = Hypernetwork.from_base(base_dir, encoder="base", r=2, hidden_dim=16)
    return hypernet.save_pretrained(tmp_path / "hypernet")


def test_test_examples_follow_the_split_rule_and_the_limit(bench, toys):
    task = toys[DEV[0]]
    chosen = bench.test_examples(task, 3)
    assert len(chosen) == 3
    assert all(is_test_example(task.name, e.input) for e in chosen)
    every = bench.test_examples(task, 1000)
    assert chosen == every[:3] and len(every) == sum(e.is_test for e in task.examples)


def test_the_answer_cache_resumes_and_forgets_answers_of_another_model(bench, toys):
    examples = bench.test_examples(toys[DEV[0]], 4)
    cache = bench.AnswerCache("base", DEV[0], {"adapter": "a"})
    cache.put(examples[:2], ["x", "y"])
    again = bench.AnswerCache("base", DEV[0], {"adapter": "a"})
    assert again.missing(examples) == examples[2:] and again.get(examples[1]) == "y"
    other = bench.AnswerCache("base", DEV[0], {"adapter": "b"})
    assert other.missing(examples) == examples


def test_a_smoke_run_fills_every_row_and_reruns_from_the_cache(
    bench, base_dir, data, toys, hypernet_dir, tmp_path, monkeypatch
):
    from capplug.training.teacher_lora import task_folder_name, train_multitask_lora

    monkeypatch.setattr(bench, "ceiling_config", tiny_config)
    multitask = tmp_path / "multitask"
    train_multitask_lora(
        multitask,
        tasks=[toys[name] for name in TRAIN],
        base=base_dir,
        config=tiny_config(),
        progress=False,
    )
    results = tmp_path / "results"
    argv = ["--data", str(data), "--hypernet", str(hypernet_dir), "--multitask", str(multitask)]
    argv += ["--per-task", str(tmp_path / "per-task"), "--train-missing", "--limit", "2"]
    argv += ["--tasks", *DEV, "--results", str(results), "--batch", "2", "--no-progress"]
    argv += ["--scorer", str(save_tiny_scorer(tmp_path / "scorer"))]

    from capplug.adapters.runtime import AdapterRuntime

    made: list[str] = []
    real_add_weights = AdapterRuntime.add_weights

    def add_weights(self, name, state_dict, config):
        made.append(name)
        return real_add_weights(self, name, state_dict, config)

    monkeypatch.setattr(AdapterRuntime, "add_weights", add_weights)
    result = bench.main(argv)

    assert made == ["generated", "generated"]  # one adapter per task, shared by both rows
    assert set(result["tasks"]) == {bench.short(t) for t in DEV}
    for row in result["tasks"].values():
        assert row["examples"] == 2
        assert all(0 <= row[v] <= 100 for v in bench.VARIANTS)
    assert all(result["mean"][v] is not None for v in bench.VARIANTS)
    assert result["missing"] == {}
    for name in DEV:  # ceilings trained through the benchmark switch, on train examples only
        summary = json.loads(
            (tmp_path / "per-task" / task_folder_name(name) / "training_summary.json").read_text()
        )
        assert summary["purpose"] == "benchmark-ceiling"
        assert summary["train_examples"] == sum(not e.is_test for e in toys[name].examples)
    timing = result["timing"]
    assert (
        set(timing["generation_seconds"]) == set(timing["training_seconds"]) == set(result["tasks"])
    )
    assert timing["speedup"] == pytest.approx(
        timing["training_median_seconds"] / timing["generation_median_seconds"]
    )
    assert [t["met"] is not None for t in result["targets"]] == [True] * 4
    # The judged row is, per task, the generated row where the adapter won its check, else base.
    assert set(result["checks"]) == set(result["tasks"])
    for task, check in result["checks"].items():
        row = result["tasks"][task]
        assert row["judged"] == row["generated" if check["winner"] == "adapter" else "base"]
        full = next(name for name in DEV if bench.short(name) == task)
        assert not toys[full].examples[check["probe"]].is_test  # never a test example
    assert "judged fallback's check: median" in (results / "instruction_to_adapter.md").read_text()
    written = json.loads((results / "instruction_to_adapter.json").read_text())
    assert written["mean"] == result["mean"]
    markdown = (results / "instruction_to_adapter.md").read_text()
    assert "per-task LoRA + definition (ceiling)" in markdown and "missing" not in markdown
    assert "dev.instruction_to_adapter: 2 of the 8 tasks of the original BIG-bench list" in (
        markdown
    )
    assert (results / "instruction_to_adapter.png").is_file()
    home = tmp_path / "home" / "bench-cache" / "instruction_to_adapter"
    assert len(list(home.glob("*/*.json"))) == len(bench.VARIANTS) * len(DEV)

    # A rerun answers nothing again: every answer comes from the cache, no model is loaded.
    def no_model(self):
        raise AssertionError("the rerun loaded a model")

    monkeypatch.setattr(bench.Models, "load_runtime", no_model)
    monkeypatch.setattr(bench.Models, "load_chat", no_model)
    again = bench.main(argv)
    assert again["tasks"] == result["tasks"] and again["mean"] == result["mean"]


def test_missing_models_are_reported_missing_never_invented(bench, base_dir, data, toys, tmp_path):
    results = tmp_path / "results"
    argv = ["--data", str(data), "--hypernet", str(tmp_path / "no-such-hypernet")]
    argv += ["--base", str(base_dir)]
    argv += ["--per-task", str(tmp_path / "empty"), "--limit", "2", "--tasks", *DEV]
    argv += ["--results", str(results), "--no-progress"]

    result = bench.main(argv)

    assert result["mean"]["base"] is not None
    for variant in ("generated", "generated-no-def", "judged", "multitask", "per-task"):
        assert result["mean"][variant] is None
        assert all(row[variant] is None for row in result["tasks"].values())
        assert variant in result["missing"]
    assert "no hypernetwork" in result["missing"]["generated"]
    assert "train-lora --multitask" in result["missing"]["multitask"]
    assert all(t["met"] is None and t["value"] is None for t in result["targets"])
    markdown = (results / "instruction_to_adapter.md").read_text()
    assert markdown.count("| missing") >= 4 * len(DEV)
    assert "not measured" in markdown and "Missing rows:" in markdown
    assert not (tmp_path / "empty").exists()  # nothing trained without --train-missing


def test_arguments_are_checked(bench, data, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", str(data), "--tasks", TRAIN[0]])
    assert "dev.instruction_to_adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", str(data), "--train-missing"])
    assert "--per-task" in capsys.readouterr().err
    args = bench.parse_args(
        ["--data", str(data), "--tasks", "subtask044_essential_terms_identifying_essential_words"]
    )
    assert args.tasks == [DEV[1]]


def test_answers_cached_for_other_task_data_are_made_again(bench, toys):
    task = toys[DEV[0]]
    examples = bench.test_examples(task, 2)
    source = {"task": bench.task_digest(task), "adapter": "a"}
    bench.AnswerCache("base", DEV[0], source).put(examples, ["x", "y"])
    changed = Task(
        **{**{f: getattr(task, f) for f in Task.__dataclass_fields__}, "instruction": "New."}
    )
    other = bench.AnswerCache("base", DEV[0], {"task": bench.task_digest(changed), "adapter": "a"})
    assert other.missing(examples) == examples
