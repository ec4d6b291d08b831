"""The one best-of-n core: signals, their combiner, and the ``capplug`` metadata schema."""

from capplug.selection.agreement import echo, rouge_agreement, rouge_l_f
from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner, fit_weights, zscores
from capplug.selection.core import (
    METADATA_KEYS,
    TOOL_CALLS_UNSCORED,
    Reranker,
    Scored,
    Selection,
    check_logprobs,
    choose,
    combiner_of,
    dedupe_key,
    distinct,
    load_combiner,
    openai_logprobs,
    score_distinct,
    signal_values,
    tool_call_order,
    unscored_metadata,
)

__all__ = [
    "CONFIG_KEY",
    "METADATA_KEYS",
    "SIGNALS",
    "TOOL_CALLS_UNSCORED",
    "Combiner",
    "Reranker",
    "Scored",
    "Selection",
    "check_logprobs",
    "choose",
    "combiner_of",
    "dedupe_key",
    "distinct",
    "echo",
    "fit_weights",
    "load_combiner",
    "openai_logprobs",
    "rouge_agreement",
    "rouge_l_f",
    "score_distinct",
    "signal_values",
    "tool_call_order",
    "unscored_metadata",
    "zscores",
]
