"""benchmarks/adapter_hit_check.py end to end: the packaged MiniLM indexes the store, a tiny
random Llama answers, and made-up tasks stand in for BIG-bench (two dev, two train)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from capplug.data.bigbench import Example, Task, task_names
from capplug.testing import save_tiny_llama

pytestmark = pytest.mark.integration

DEV = task_names("dev", "instruction_to_adapter")[:2]
TRAIN = ["natural_instructions/toy_train_a", "natural_instructions/toy_train_b"]
WORDS = "the cat dog sat mat sky blue red one two three river city".split()


def toy_task(name: str, definition: str) -> Task:
    examples = []
    for i in range(30):
        text = f"{WORDS[i % 13]} {WORDS[(3 * i + 1) % 13]} {i}"
        examples.append(
            Example(
                task=name, index=i, input=text, prompt=text, query=text, targets=[text.split()[0]]
            )
        )
    return Task(name=name, description="toy", examples=examples, definition=definition)


@pytest.fixture
def bench(tmp_path, monkeypatch):
    import capplug.data.bigbench as bigbench
    import capplug.training.teacher_lora as lora
    from capplug import Scorer
    from capplug.adapters import Hypernetwork
    from capplug.testing import save_tiny_scorer

    tasks = {
        DEV[0]: toy_task(DEV[0], "Repeat the first word of the sentence."),
        DEV[1]: toy_task(DEV[1], "Translate the sentence into German."),
        # Worded like DEV[0]: the store hits it at 0.8; nothing is like DEV[1].
        TRAIN[0]: toy_task(TRAIN[0], "Repeat the first word of the sentence given."),
        TRAIN[1]: toy_task(TRAIN[1], "Count the letters of the longest word."),
    }
    monkeypatch.setattr(bigbench, "load_task", lambda name, archive=None: tasks[name])
    monkeypatch.setattr(lora, "train_task_names", lambda: list(TRAIN))
    tiny_scorer = Scorer.from_pretrained(save_tiny_scorer(tmp_path / "scorer"), device="cpu")
    monkeypatch.setattr(Scorer, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_scorer))
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    base = save_tiny_llama(tmp_path / "llama")
    hypernet = Hypernetwork.from_base(base, encoder="base", r=2, hidden_dim=16)
    folder = hypernet.save_pretrained(tmp_path / "hypernet")
    return importlib.import_module("benchmarks.adapter_hit_check"), folder


def _run(module, folder: Path, out: Path, bar: float) -> dict:
    argv = ["--hypernet", str(folder), "--limit", "3", "--bar", str(bar), "--device", "cpu"]
    assert module.main([*argv, "--tasks", *DEV, "--results", str(out)]) == 0
    return json.loads((out / "adapter_hit_check.json").read_text())


def test_hits_are_kept_or_refused_by_the_bar(bench, tmp_path):
    module, folder = bench
    keep_all = _run(module, folder, tmp_path / "keep", bar=0.0)
    run = keep_all["thresholds"]["0.8"]
    first = run["tasks"][DEV[0].split("/")[-1]]
    assert [h["task"] for h in first["hits"]][:1] == ["toy_train_a"]
    assert not run["tasks"][DEV[1].split("/")[-1]]["hits"]  # nothing worded like it
    assert run["refused"] == 0 and run["mean"]["checked"] == run["mean"]["unchecked"]

    refuse_all = _run(module, folder, tmp_path / "refuse", bar=1.0)
    for run in refuse_all["thresholds"].values():
        assert run["refused"] == run["hits"] > 0
        assert run["mean"]["checked"] == run["mean"]["fresh"]  # every refusal made a fresh one
        assert run["check_median_seconds"] > 0
    report = (tmp_path / "refuse" / "adapter_hit_check.md").read_text()
    assert "| 0.8 |" in report and "toy_train_a" in report
