"""Shared fixtures: tiny random checkpoints built locally, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "what",
    "which",
    "who",
    "where",
    "when",
    "how",
    "why",
    "of",
    "to",
    "in",
    "on",
    "for",
    "and",
    "or",
    "not",
    "yes",
    "no",
    "capital",
    "france",
    "paris",
    "lyon",
    "london",
    "england",
    "city",
    "river",
    "answer",
    "question",
    "choose",
    "option",
    "true",
    "false",
    "cat",
    "dog",
    "sat",
    "mat",
    "sky",
    "blue",
    "red",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "plus",
    "minus",
    "equals",
    "number",
]


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(
        "abcdefghijklmnopqrstuvwxyz0123456789?.,!"
    )
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>"))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=128,
    )


def _tiny_bert_config(tokenizer, **overrides):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **overrides,
    )


@pytest.fixture(scope="session")
def tiny_bert_scorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random single-logit BERT checkpoint that records the sigmoid score mapping."""
    from transformers import BertForSequenceClassification

    tokenizer = _wordpiece_tokenizer()
    config = _tiny_bert_config(tokenizer, num_labels=1, capplug_score_mapping="sigmoid")
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
