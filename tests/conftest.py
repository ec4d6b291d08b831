"""Shared fixtures: tiny random checkpoints built locally, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capplug.testing import bpe_tokenizer as _bpe_tokenizer
from capplug.testing import save_tiny_scorer
from capplug.testing import tiny_bert_config as _tiny_bert_config
from capplug.testing import wordpiece_tokenizer as _wordpiece_tokenizer


@pytest.fixture(scope="session")
def tiny_bert_scorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random single-logit BERT checkpoint that records the sigmoid score mapping."""
    return save_tiny_scorer(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_roberta_regression(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random RoBERTa with one raw regression logit and no recorded mapping, like Cappy."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = _bpe_tokenizer()
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
        num_labels=1,
    )
    torch.manual_seed(1)
    model = RobertaForSequenceClassification(config)
    # Scale the head so raw logits spread beyond [0, 1] and clipping is exercised.
    with torch.no_grad():
        model.classifier.out_proj.weight.normal_(0.0, 3.0)
        model.classifier.out_proj.bias.fill_(0.5)
    folder = tmp_path_factory.mktemp("tiny-roberta")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare random BERT encoder (no head), like the packaged MiniLM."""
    from transformers import BertModel

    tokenizer = _wordpiece_tokenizer()
    config = _tiny_bert_config(tokenizer)
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("tiny-backbone")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
