"""benchmarks/adapter_fallback.py on a tiny random Llama, an untrained hypernetwork and a tiny
scorer: every figure is filled from real calls, and the report says what was measured."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from capplug.testing import save_tiny_llama, save_tiny_scorer


def test_a_smoke_run_measures_cost_and_sabotage(tmp_path: Path, monkeypatch) -> None:
    from capplug.adapters import Hypernetwork

    bench = importlib.import_module("benchmarks.adapter_fallback")
    base = save_tiny_llama(tmp_path / "llama")
    hypernet = Hypernetwork.from_base(base, encoder="base", r=2, hidden_dim=8)
    folder = hypernet.save_pretrained(tmp_path / "hypernet")
    monkeypatch.setattr(bench, "CASES", bench.CASES[:2])
    argv = ["--hypernet", str(folder), "--scorer", str(save_tiny_scorer(tmp_path / "scorer"))]
    argv += ["--tokens", "3", "--scales", "2", "--seeds", "2", "--device", "cpu"]
    result = bench.main([*argv, "--results", str(tmp_path / "results")])

    assert result["cases"] == 2 and len(result["rows"]) == 2
    assert result["answer_median_seconds"] > 0 and result["check_median_seconds"] > 0
    assert result["sabotage"] == {"2": {"caught": result["sabotage"]["2"]["caught"], "total": 4}}
    assert 0 <= result["generated_kept"] <= 2
    assert {r["winner"] for r in result["rows"]} <= {"adapter", "base"}
    written = json.loads((tmp_path / "results" / "adapter_fallback.json").read_text())
    assert written["check_over_answer"] == pytest.approx(result["check_over_answer"])
    markdown = (tmp_path / "results" / "adapter_fallback.md").read_text()
    assert "| the check: both answers in one batch + one selection |" in markdown


def test_arguments_are_checked(capsys) -> None:
    bench = importlib.import_module("benchmarks.adapter_fallback")
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0"])
    assert "must be positive" in capsys.readouterr().err
