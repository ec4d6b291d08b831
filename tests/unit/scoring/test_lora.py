"""Task scorers as LoRAs: trained, written, loaded and merged with the scores they trained to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capplug import Scorer
from capplug.data.rows import LabelledPair
from capplug.errors import AdapterFileError, WrongBaseModelError
from capplug.models.adapter_folder import ADAPTER_WEIGHTS, read_adapter
from capplug.scoring.lora import KIND, META_KIND, add_lora, lora_factors, write_lora
from capplug.training.scorer import TrainConfig, train_scorer

QUESTION = "what is two plus one ?"
ANSWERS = ["yes the answer is three", "no cat dog sat"]


def preferring(scorer: Scorer, wanted: str, n: int = 12) -> list[LabelledPair]:
    """Pairs that teach ``scorer`` to prefer ``wanted`` among ANSWERS."""
    return [
        LabelledPair(f"what is {i} plus one ?", text, float(text == wanted), f"g{i}")
        for i in range(n)
        for text in ANSWERS
    ]


def train_lora(scorer: Scorer, pairs: list[LabelledPair], out: Path) -> Scorer:
    config = TrainConfig(
        lora_rank=4, learning_rate=2e-2, batch_size=8, epochs=8, eval_every=100, rank_weight=1.0
    )
    train_scorer(scorer, pairs, out, config=config, progress=False)
    return scorer


def test_a_trained_task_scorer_is_a_small_lora_that_loads_with_its_scores(
    tiny_bert_scorer: Path, tmp_path: Path
) -> None:
    base = Scorer.from_pretrained(tiny_bert_scorer)
    before = base.score(QUESTION, ANSWERS)
    unwanted = ANSWERS[int(before[1] > before[0])]  # the one the base prefers
    trained = train_lora(
        Scorer.from_pretrained(tiny_bert_scorer),
        preferring(base, next(a for a in ANSWERS if a != unwanted)),
        tmp_path / "run",
    )
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / "config.json").is_file()  # no checkpoint, only the LoRA
    files = read_adapter(tmp_path / "run")
    assert files.metadata[META_KIND] == KIND
    assert files.config.base_model_name_or_path == base.name
    loaded = Scorer.from_pretrained(tmp_path / "run")
    after = loaded.score(QUESTION, ANSWERS)
    assert after == pytest.approx(trained.score(QUESTION, ANSWERS), abs=1e-5)
    assert ANSWERS[int(after[1] > after[0])] != unwanted  # the preference it was taught
    assert base.score(QUESTION, ANSWERS) == before  # the starting scorer is untouched


def test_with_lora_shares_the_untouched_weights_and_changes_nothing_in_the_base(
    tiny_bert_scorer: Path, tmp_path: Path
) -> None:
    base = Scorer.from_pretrained(tiny_bert_scorer)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    work = Scorer.from_pretrained(tiny_bert_scorer)
    torch.manual_seed(0)
    add_lora(work.model, 4)
    factors = {k: (torch.randn_like(v) * 0.5) for k, v in lora_factors(work.model).items()}
    write_lora(
        factors,
        tmp_path / "lora",
        alpha=8,
        base_name=base.name,
        architecture=base.identity.architecture,
    )
    adapted = base.with_lora(tmp_path / "lora")
    assert adapted.score(QUESTION, ANSWERS) != base.score(QUESTION, ANSWERS)
    for key, value in base.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert (
        adapted.model.state_dict()[embeddings].data_ptr()
        == base.model.state_dict()[embeddings].data_ptr()
    )


def test_a_task_scorer_for_another_scorer_or_with_broken_files_is_refused(
    tiny_bert_scorer: Path, tmp_path: Path
) -> None:
    base = Scorer.from_pretrained(tiny_bert_scorer)
    work = Scorer.from_pretrained(tiny_bert_scorer)
    add_lora(work.model, 2)
    factors = lora_factors(work.model)
    arch = base.identity.architecture
    write_lora(factors, tmp_path / "other", alpha=4, base_name="someone/else", architecture=arch)
    with pytest.raises(WrongBaseModelError, match="someone/else"):
        base.with_lora(tmp_path / "other")
    write_lora(factors, tmp_path / "cut", alpha=4, base_name=base.name, architecture=arch)
    weights = tmp_path / "cut" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterFileError):
        base.with_lora(tmp_path / "cut")
    with pytest.raises(AdapterFileError):
        Scorer.from_pretrained(tmp_path / "cut")


def test_a_lora_run_refuses_an_output_folder_that_holds_one(
    tiny_bert_scorer: Path, tmp_path: Path
) -> None:
    base = Scorer.from_pretrained(tiny_bert_scorer)
    train_lora(Scorer.from_pretrained(tiny_bert_scorer), preferring(base, ANSWERS[0], 4), tmp_path)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["config"]["lora_rank"] == 4
    with pytest.raises(ValueError, match="already holds"):
        train_lora(
            Scorer.from_pretrained(tiny_bert_scorer), preferring(base, ANSWERS[0], 4), tmp_path
        )
