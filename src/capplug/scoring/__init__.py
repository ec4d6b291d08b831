"""The scorer: model wrapper, truncation, training (chats to text: :mod:`capplug.chat`)."""

from capplug.chat import Instruction, flatten_chat
from capplug.scoring.model import (
    SCORE_MAPPING_KEY,
    Ranked,
    ScoreMapping,
    Scorer,
    TruncationWarning,
    load_scorer,
)

__all__ = [
    "SCORE_MAPPING_KEY",
    "Instruction",
    "Ranked",
    "ScoreMapping",
    "Scorer",
    "TruncationWarning",
    "flatten_chat",
    "load_scorer",
]
