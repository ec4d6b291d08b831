"""benchmarks/adapter_hit_check.py end to end: the packaged MiniLM indexes the store, a tiny
random Llama answers, and a small task pool of made-up Natural Instructions tasks stands in for
the shared one (two dev, two train)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from bench_pool import ni_task, write_pool

from capplug.testing import save_tiny_llama

pytestmark = pytest.mark.integration

DEV = [
    "natural_instructions_v1/subtask043_essential_terms_answering_incomplete_questions",
    "natural_instructions_v1/subtask044_essential_terms_identifying_essential_words",
]
TRAIN = ["natural_instructions_v1/toy_train_a", "natural_instructions_v1/toy_train_b"]
WORDS = "the cat dog sat mat sky blue red one two three river city".split()


def toy_task(definition: str) -> dict:
    texts = [f"{WORDS[i % 13]} {WORDS[(3 * i + 1) % 13]} {i}" for i in range(30)]
    return ni_task(definition, [(text, text.split()[0]) for text in texts])


@pytest.fixture
def bench(tmp_path, monkeypatch):
    from capplug import Scorer
    from capplug.adapters import Hypernetwork
    from capplug.testing import save_tiny_scorer

    data = write_pool(
        tmp_path / "data",
        {
            DEV[0]: ("dev", toy_task("Repeat the first word of the sentence.")),
            DEV[1]: ("dev", toy_task("Translate the sentence into German.")),
            # Worded like DEV[0]: the store hits it at 0.8; nothing is like DEV[1].
            TRAIN[0]: ("train", toy_task("Repeat the first word of the sentence given.")),
            TRAIN[1]: ("train", toy_task("Count the letters of the longest word.")),
        },
    )
    tiny_scorer = Scorer.from_pretrained(save_tiny_scorer(tmp_path / "scorer"), device="cpu")
    monkeypatch.setattr(Scorer, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_scorer))
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    base = save_tiny_llama(tmp_path / "llama")
    hypernet = Hypernetwork.from_base(base, encoder="base", r=2, hidden_dim=16)
    folder = hypernet.save_pretrained(tmp_path / "hypernet")
    return importlib.import_module("benchmarks.adapter_hit_check"), folder, data


def _run(module, folder: Path, data: Path, out: Path, bar: float) -> dict:
    argv = ["--data", str(data), "--hypernet", str(folder), "--limit", "3", "--bar", str(bar)]
    argv += ["--device", "cpu"]
    assert module.main([*argv, "--tasks", *DEV, "--results", str(out)]) == 0
    return json.loads((out / "adapter_hit_check.json").read_text())


def test_hits_are_kept_or_refused_by_the_bar(bench, tmp_path):
    module, folder, data = bench
    keep_all = _run(module, folder, data, tmp_path / "keep", bar=0.0)
    assert keep_all["store"].startswith("2 adapters")
    run = keep_all["thresholds"]["0.8"]
    first = run["tasks"][DEV[0].split("/")[-1]]
    assert [h["task"] for h in first["hits"]][:1] == ["toy_train_a"]
    assert not run["tasks"][DEV[1].split("/")[-1]]["hits"]  # nothing worded like it
    assert run["refused"] == 0 and run["mean"]["checked"] == run["mean"]["unchecked"]

    refuse_all = _run(module, folder, data, tmp_path / "refuse", bar=1.0)
    for run in refuse_all["thresholds"].values():
        assert run["refused"] == run["hits"] > 0
        assert run["mean"]["checked"] == run["mean"]["fresh"]  # every refusal made a fresh one
        assert run["check_median_seconds"] > 0
    report = (tmp_path / "refuse" / "adapter_hit_check.md").read_text()
    assert "| 0.8 |" in report and "toy_train_a" in report
    assert "dev.instruction_to_adapter: 2 of the 8 tasks of the original BIG-bench list" in report
