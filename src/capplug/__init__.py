"""capplug: a small scorer that reranks LLM answers, and instruction-to-adapter LoRAs."""

from capplug.errors import CapplugError, CheckpointError, ModelNotFoundError, PackageFetchError
from capplug.models import resolve
from capplug.scoring import Ranked, Scorer, TruncationWarning, flatten_chat
from capplug.selection import Reranker, Scored, Selection

__version__ = "0.1.0"

__all__ = [
    "CapplugError",
    "CheckpointError",
    "ModelNotFoundError",
    "PackageFetchError",
    "Ranked",
    "Reranker",
    "Scored",
    "Scorer",
    "Selection",
    "TruncationWarning",
    "__version__",
    "flatten_chat",
    "resolve",
]
