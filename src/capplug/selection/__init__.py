"""The one best-of-n core: signals, their combiner, and the ``capplug`` metadata schema."""

from capplug.selection.agreement import echo, rouge_agreement, rouge_l_f
from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner, fit_weights, zscores
from capplug.selection.core import (
    Reranker,
    Scored,
    Selection,
    check_logprobs,
    choose,
    combiner_of,
    dedupe_key,
    load_combiner,
    openai_logprobs,
    score_distinct,
    signal_values,
)

__all__ = [
    "CONFIG_KEY",
    "SIGNALS",
    "Combiner",
    "Reranker",
    "Scored",
    "Selection",
    "check_logprobs",
    "choose",
    "combiner_of",
    "dedupe_key",
    "echo",
    "fit_weights",
    "load_combiner",
    "openai_logprobs",
    "rouge_agreement",
    "rouge_l_f",
    "score_distinct",
    "signal_values",
    "zscores",
]
