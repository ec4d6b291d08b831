"""Tiny random checkpoints, built locally in a second, for testing code that uses capplug.

Nothing here is downloaded: the tokenizers are made from a small word list and the weights are
random, so scores mean nothing, but every code path (tokenising, batching, score mapping,
saving and loading) is the real one.

    from capplug.testing import save_tiny_scorer
    scorer = Scorer.from_pretrained(save_tiny_scorer(tmp_path / "scorer"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["WORDS", "bpe_tokenizer", "save_tiny_scorer", "tiny_bert_config", "wordpiece_tokenizer"]

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


def wordpiece_tokenizer():
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


def bpe_tokenizer():
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


def tiny_bert_config(tokenizer: Any, **overrides: Any) -> Any:
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


def save_tiny_scorer(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a random single-logit BERT scorer (sigmoid score mapping) to ``folder``."""
    import torch
    from transformers import BertForSequenceClassification

    tokenizer = wordpiece_tokenizer()
    config = tiny_bert_config(tokenizer, num_labels=1, capplug_score_mapping="sigmoid")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
