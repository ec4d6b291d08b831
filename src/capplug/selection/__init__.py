"""The one best-of-n core: signals, their combiner, and the ``capplug`` metadata schema."""

from capplug.selection.agreement import rouge_agreement, rouge_l_f
from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner, fit_weights, zscores
from capplug.selection.core import (
    Reranker,
    Scored,
    Selection,
    check_logprobs,
    load_combiner,
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
    "fit_weights",
    "load_combiner",
    "rouge_agreement",
    "rouge_l_f",
    "signal_values",
    "zscores",
]
