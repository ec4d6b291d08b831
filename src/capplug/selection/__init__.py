"""The one best-of-n core: signals, their combiner, the one selection path, and the ``capplug``
metadata schema.

- ``core``: the policy (:func:`choose`), the one :class:`Selection` type and its metadata;
- ``selector``: the path every surface takes (:class:`Selector`: task-scorer lookup, scoring
  the distinct candidates, choosing, recording);
- ``reranker``: :class:`Reranker`, the Python API, which configures that path;
- ``agreement``, ``combiner``, ``fit``: the agreement signal, the weights and their fitting.
"""

from capplug.selection.agreement import echo, rouge_agreement, rouge_l_f
from capplug.selection.combiner import CONFIG_KEY, SIGNALS, Combiner, fit_weights, zscores
from capplug.selection.core import (
    DEFAULT_COMBINER,
    METADATA_KEYS,
    SCORER_ONLY,
    TOOL_CALLS_UNSCORED,
    Scored,
    Selection,
    check_logprobs,
    choose,
    combiner_of,
    dedupe_key,
    distinct,
    load_combiner,
    openai_logprobs,
    reply_logprobs,
    score_distinct,
    signal_values,
    tool_call_order,
    unscored_metadata,
)
from capplug.selection.reranker import Reranker
from capplug.selection.selector import (
    AsyncScore,
    Selector,
    as_task_scorers,
    lm_logprobs,
    record,
    signals_for,
)

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_COMBINER",
    "METADATA_KEYS",
    "SCORER_ONLY",
    "SIGNALS",
    "TOOL_CALLS_UNSCORED",
    "AsyncScore",
    "Combiner",
    "Reranker",
    "Scored",
    "Selection",
    "Selector",
    "as_task_scorers",
    "check_logprobs",
    "choose",
    "combiner_of",
    "dedupe_key",
    "distinct",
    "echo",
    "fit_weights",
    "lm_logprobs",
    "load_combiner",
    "openai_logprobs",
    "record",
    "reply_logprobs",
    "rouge_agreement",
    "rouge_l_f",
    "score_distinct",
    "signal_values",
    "signals_for",
    "tool_call_order",
    "unscored_metadata",
    "zscores",
]
