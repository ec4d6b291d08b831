"""The scorer: model wrapper, text formatting and truncation, training."""

from capplug.scoring.formatting import Instruction, flatten_chat
from capplug.scoring.model import SCORE_MAPPING_KEY, Ranked, ScoreMapping, Scorer, TruncationWarning

__all__ = [
    "SCORE_MAPPING_KEY",
    "Instruction",
    "Ranked",
    "ScoreMapping",
    "Scorer",
    "TruncationWarning",
    "flatten_chat",
]
