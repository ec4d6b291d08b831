"""Checkpoints shipped as what training changed over a backbone, and rebuilt once into the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from capplug import CheckpointError, Scorer
from capplug.models.delta import DELTA_WEIGHTS, export_delta, materialize


def test_delta_holds_only_what_changed_and_rebuilds_the_same_scorer(
    tiny_bert_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    scorer = Scorer.from_backbone(tiny_bert_backbone, seed=0)
    with torch.no_grad():  # what training would do: change the encoder, keep the word embeddings
        for name, param in scorer.model.named_parameters():
            if "word_embeddings" not in name:
                param.add_(0.01)
    trained = scorer.save_pretrained(tmp_path / "trained")
    delta = export_delta(trained, tmp_path / "delta", base=str(tiny_bert_backbone))
    stored = load_file(delta / DELTA_WEIGHTS)
    assert not any("word_embeddings" in key for key in stored)
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    assert not (delta / "tokenizer.json").exists()  # the backbone's own tokenizer is used

    # A delta folder given by path loads like the bundled one (e.g. to adapt from a copy of it).
    np.testing.assert_allclose(
        Scorer.from_pretrained(delta).score("capital of france ?", ["paris"]),
        scorer.score("capital of france ?", ["paris"]),
        atol=1e-3,
    )
    rebuilt = materialize(delta, "tiny")
    assert (rebuilt / "tokenizer.json").is_file()
    assert materialize(delta, "tiny") == rebuilt  # built once
    responses = ["paris", "lyon", "the capital of france is paris ."]
    np.testing.assert_allclose(
        Scorer.from_pretrained(rebuilt).score("capital of france ?", responses),
        scorer.score("capital of france ?", responses),
        atol=1e-3,  # float16 storage of the changed tensors
    )


def test_a_damaged_delta_is_refused(
    tiny_bert_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    trained = Scorer.from_backbone(tiny_bert_backbone, seed=0).save_pretrained(tmp_path / "trained")
    delta = export_delta(trained, tmp_path / "delta", base=str(tiny_bert_backbone))
    with open(delta / DELTA_WEIGHTS, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="damaged"):
        materialize(delta, "tiny")


def test_a_changed_config_reaches_the_rebuilt_checkpoint_without_a_rebuild(
    tiny_bert_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from capplug.selection import Combiner, Reranker
    from capplug.selection.fit import write_combiner

    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    trained = Scorer.from_backbone(tiny_bert_backbone, seed=0).save_pretrained(tmp_path / "trained")
    delta = export_delta(trained, tmp_path / "delta", base=str(tiny_bert_backbone))
    rebuilt = materialize(delta, "tiny")
    weights_file = (rebuilt / "model.safetensors").stat().st_mtime_ns
    # New selection weights shipped in the delta's config (an upgrade): picked up, not rebuilt.
    write_combiner(Combiner({"agreement": {"agreement": 3.0}}), delta)
    assert materialize(delta, "tiny") == rebuilt
    assert "capplug_selection" in json.loads((rebuilt / "config.json").read_text())
    assert (rebuilt / "model.safetensors").stat().st_mtime_ns == weights_file
    ranker = Reranker(Scorer.from_pretrained(delta))
    assert ranker.combiner.weights == {"agreement": {"agreement": 3.0}}
