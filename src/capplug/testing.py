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

__all__ = [
    "WORDS",
    "bpe_tokenizer",
    "chat_tokenizer",
    "save_random_lora",
    "save_tiny_llama",
    "save_tiny_scorer",
    "tiny_bert_config",
    "wordpiece_tokenizer",
]

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


CHAT_WORDS = (
    "the a is are what which who where how of to in on and or not yes no capital france paris "
    "city river answer question option true false cat dog sat mat sky blue red one two three"
).split()
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(*, chat_template: bool = True, pad: bool = False):
    """A byte-level BPE tokenizer with ChatML turn tokens (``<|im_start|>``, ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([" ".join(CHAT_WORDS)] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>" if pad else None,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llama(
    folder: str | Path, *, chat_template: bool = True, pad: bool = False, seed: int = 0
) -> Path:
    """Write a random 2-layer Llama chat model with grouped-query attention to ``folder``.

    32 wide, 4 query heads sharing 2 key/value heads (so ``v_proj`` is 32 -> 16 while ``q_proj``
    is 32 -> 32, as in SmolLM2), with a ChatML template and sharpened next-token distributions.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer(chat_template=chat_template, pad=pad)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Sharpen the random next-token distributions so greedy, beam and sampling differ, and
        # make the end-of-turn token likely enough that some candidates finish on their own.
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[tokenizer.eos_token_id] *= 3.0
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_random_lora(
    folder: str | Path, base: str | Path, *, r: int = 4, scale: float = 3.0, seed: int = 0
) -> Path:
    """Write a deliberately bad LoRA for the Llama-style model at ``base``: large random weights
    on every layer's ``q_proj`` and ``v_proj``, enough to rewrite its greedy answers (a stand-in
    for a generated adapter that wrecks a task). A standard peft folder, for that base model.
    """
    import torch
    from peft import LoraConfig
    from transformers import AutoConfig

    from capplug.models.adapter_folder import canonical_model_name, peft_key, write_peft_folder

    config = AutoConfig.from_pretrained(base)
    width = config.hidden_size
    head = getattr(config, "head_dim", None) or width // config.num_attention_heads
    kv_width = head * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    shapes = {"q_proj": (width, width), "v_proj": (width, kv_width)}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            path = f"model.layers.{layer}.self_attn.{name}"
            state[peft_key(path, "A")] = scale * torch.randn(r, fan_in, generator=generator)
            state[peft_key(path, "B")] = scale * torch.randn(fan_out, r, generator=generator)
    lora = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=sorted(shapes),
        base_model_name_or_path=canonical_model_name(base),
    )
    return write_peft_folder(state, lora, folder)
