"""Agreement among candidates: how much each one says what the others say (MBR by Rouge-L).

Sampled answers to the same question that agree with many others tend to be right: this is
minimum-Bayes-risk selection with Rouge-L as the utility. Each candidate gets its mean Rouge-L F
to the other candidates in the list (repeats count, so an answer drawn five times agrees with
itself four times). No model is needed; the longest common subsequence is computed bit-parallel
over Python integers, so 17 candidates of 64 tokens take about a millisecond.

Tokens are lower-cased runs of letters and digits, with each CJK character a token of its own;
unlike Rouge-L as a metric there is no stemming (it is a similarity, and stemming is slow).

Long texts are capped before anything is tokenised, so that a huge candidate or conversation
costs no more than a long ordinary one: a candidate counts by its first
:data:`MAX_CANDIDATE_WORDS` words, an instruction by its last :data:`MAX_INSTRUCTION_WORDS`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from capplug.chat import dedupe_key, distinct

__all__ = [
    "MAX_CANDIDATE_WORDS",
    "MAX_INSTRUCTION_WORDS",
    "echo",
    "rouge_agreement",
    "rouge_l_f",
    "tokens",
    "word_counts",
]

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W_]+")

MAX_CANDIDATE_WORDS = 1024
"""A candidate is compared by its first this many words (LCS cost grows with both lengths)."""
MAX_INSTRUCTION_WORDS = 4096
"""The instruction is compared by its last this many words (its end holds the question)."""
_CHARS_PER_WORD = 32  # characters kept per word wanted, before tokenising; words are shorter


def _head(text: str) -> list[str]:
    return tokens(text[: MAX_CANDIDATE_WORDS * _CHARS_PER_WORD])[:MAX_CANDIDATE_WORDS]


def _tail(text: str) -> list[str]:
    words = tokens(text[-MAX_INSTRUCTION_WORDS * _CHARS_PER_WORD :])
    return words[-MAX_INSTRUCTION_WORDS:]


def tokens(text: str) -> list[str]:
    """The words Rouge-L compares: lower-cased letters and digits, CJK one character each."""
    return _TOKEN.findall(text.lower())


def _masks(words: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, word in enumerate(words):
        masks[word] = masks.get(word, 0) | (1 << i)
    return masks


def _lcs(masks: dict[str, int], length: int, other: list[str]) -> int:
    # Allison-Dix / Hyyro bit-vector LCS: the zero bits of v count the common subsequence.
    full = (1 << length) - 1
    v = full
    for word in other:
        u = v & masks.get(word, 0)
        v = ((v + u) | (v - u)) & full
    return length - v.bit_count()


def rouge_l_f(a: str, b: str) -> float:
    """Rouge-L F-measure of two texts (symmetric), on :func:`tokens`."""
    ta, tb = tokens(a), tokens(b)
    return _f(ta, _masks(ta), tb)


def _f(ta: list[str], masks: dict[str, int], tb: list[str]) -> float:
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    return 2.0 * _lcs(masks, len(ta), tb) / (len(ta) + len(tb))


def rouge_agreement(texts: Sequence[str]) -> np.ndarray:
    """Each text's mean Rouge-L F to the other texts of the list, in list order.

    Repeated texts (equal up to whitespace: :func:`capplug.chat.distinct`) count once per
    occurrence. A list of one text gets 0.0.
    """
    n = len(texts)
    if n < 2:
        return np.zeros(n)
    unique, where = distinct(texts)
    counts = np.bincount(where, minlength=len(unique)).astype(float)
    words = [_head(t) for t in unique]
    masks = [_masks(w) for w in words]
    sim = np.eye(len(unique))
    for i in range(len(unique)):
        for j in range(i + 1, len(unique)):
            sim[i, j] = sim[j, i] = _f(words[i], masks[i], words[j])
    # Sum over every other occurrence: all occurrences of all texts, less the text itself once.
    per_distinct = (sim @ counts - 1.0) / (n - 1)
    return per_distinct[where]


def word_counts(texts: Sequence[str]) -> np.ndarray:
    """Words per text, as :func:`tokens` counts them (up to :data:`MAX_CANDIDATE_WORDS`)."""
    return np.array([len(_head(t)) for t in texts], dtype=float)


def echo(instruction: str, texts: Sequence[str]) -> np.ndarray:
    """How much of each text repeats the instruction: its longest common subsequence with the
    instruction over its own length (1.0: a copy of part of the prompt; 0.0 for no words)."""
    source = _tail(instruction)
    out = np.zeros(len(texts))
    cache: dict[str, float] = {}
    for i, text in enumerate(texts):
        key = dedupe_key(text)
        if key not in cache:
            words = _head(text)
            cache[key] = _lcs(_masks(words), len(words), source) / len(words) if words else 0.0
        out[i] = cache[key]
    return out
