"""The scorer's precision on a CPU: the rule, the calibration, its cache, and the float32 head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capplug import Scorer
from capplug.scoring import precision as _precision
from capplug.scoring.precision import ENV_VAR, Precision

QUESTION = "what is the capital of france ?"
RESPONSES = ["paris", "lyon", "the capital of france is paris .", "london"]


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No forced precision, and a fresh capplug home for the calibration cache."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path))
    return tmp_path / _precision.CACHE_FILE


def test_an_explicit_dtype_is_used_as_given(tiny_bert_scorer: Path, auto: Path) -> None:
    scorer = Scorer.from_pretrained(tiny_bert_scorer, dtype="bfloat16")
    assert scorer.dtype == torch.bfloat16
    assert scorer.precision.reason == "given"
    assert next(scorer.model.classifier.parameters()).dtype == torch.float32
    assert not auto.exists()  # nothing was calibrated


def test_the_environment_variable_forces_a_precision(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    assert Scorer.from_pretrained(tiny_bert_scorer).dtype == torch.bfloat16
    monkeypatch.setenv(ENV_VAR, "float16")
    with pytest.raises(ValueError, match=ENV_VAR):
        Scorer.from_pretrained(tiny_bert_scorer)


def test_no_native_bfloat16_means_float32_without_calibrating(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_precision, "native_bf16", lambda: False)
    monkeypatch.setattr(_precision, "calibrate", _fail)
    scorer = Scorer.from_pretrained(tiny_bert_scorer)
    assert scorer.dtype == torch.float32
    assert "no native bfloat16" in scorer.precision.reason


def test_calibration_runs_once_per_machine_and_model_shape(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_precision, "native_bf16", lambda: True)
    calls = []

    def fake(scorer: Scorer) -> Precision:
        calls.append(scorer)
        return Precision("bfloat16", "calibrated: 2.0x float32, same ranking", 2.0, 1.0)

    monkeypatch.setattr(_precision, "calibrate", fake)
    first = Scorer.from_pretrained(tiny_bert_scorer)
    second = Scorer.from_pretrained(tiny_bert_scorer)
    assert len(calls) == 1
    assert first.dtype == second.dtype == torch.bfloat16
    assert second.precision.speedup == 2.0
    (entry,) = json.loads(auto.read_text()).values()
    assert entry["dtype"] == "bfloat16"


def test_calibration_keeps_float32_when_bfloat16_is_not_faster(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = Scorer.from_pretrained(tiny_bert_scorer, dtype="float32")
    monkeypatch.setattr(_precision, "MIN_SPEEDUP", 1e9)
    chosen = _precision.calibrate(scorer)
    assert chosen.dtype == "float32"
    assert "only" in chosen.reason and chosen.speedup is not None
    assert chosen.spearman is not None and -1.0 <= chosen.spearman <= 1.0


def test_calibration_keeps_float32_when_bfloat16_ranks_differently(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = Scorer.from_pretrained(tiny_bert_scorer, dtype="float32")
    monkeypatch.setattr(_precision, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(_precision, "MIN_SPEARMAN", 1.01)  # no ranking can pass
    chosen = _precision.calibrate(scorer)
    assert chosen.dtype == "float32"
    assert "ranks the probes differently" in chosen.reason


def test_an_unwritable_cache_only_costs_a_calibration(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_precision, "native_bf16", lambda: True)
    monkeypatch.setattr(_precision, "calibrate", lambda s: Precision("float32", "measured"))
    auto.mkdir()  # a folder where the cache file should be: writing it fails
    assert Scorer.from_pretrained(tiny_bert_scorer).dtype == torch.float32


def test_bfloat16_scores_with_a_float32_head_and_survives_training_precision(
    tiny_bert_scorer: Path,
) -> None:
    fast = Scorer.from_pretrained(tiny_bert_scorer, dtype="bfloat16")
    exact = Scorer.from_pretrained(tiny_bert_scorer, dtype="float32")
    np.testing.assert_allclose(
        fast.score(QUESTION, RESPONSES), exact.score(QUESTION, RESPONSES), atol=2e-2
    )
    # Training puts the weights in float32 and back; the head stays float32 and scores.
    fast.model.float()
    _precision.prepare(fast.model, fast.device, torch.bfloat16)
    assert next(fast.model.bert.encoder.parameters()).dtype == torch.bfloat16
    assert next(fast.model.classifier.parameters()).dtype == torch.float32
    assert len(fast.score(QUESTION, RESPONSES)) == len(RESPONSES)


def _fail(*args: object) -> None:
    raise AssertionError("calibrated although the rule needs no calibration")


def test_a_cache_entry_this_version_cannot_read_is_calibrated_again(
    tiny_bert_scorer: Path, auto: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_precision, "native_bf16", lambda: True)
    monkeypatch.setattr(_precision, "calibrate", lambda s: Precision("float32", "measured"))
    Scorer.from_pretrained(tiny_bert_scorer)
    entries = json.loads(auto.read_text())
    auto.write_text(json.dumps({key: {"dtype": "int4"} for key in entries}))
    assert Scorer.from_pretrained(tiny_bert_scorer).precision.reason == "measured"
    assert list(json.loads(auto.read_text()).values()) == [
        {"dtype": "float32", "reason": "measured", "speedup": None, "spearman": None}
    ]
