"""Every exception and warning capplug raises on purpose, so callers can catch them by kind.

The hierarchy::

    CapplugError(Exception)
    ├── ModelNotFoundError(LookupError)      a model reference names nothing that exists
    ├── PackageFetchError(RuntimeError)      a packaged model or data set could not be fetched
    ├── CheckpointError(ValueError)          a checkpoint is unusable for the job
    │   └── AdapterFileError                 an adapter folder is missing, corrupt or does not fit
    │       ├── WrongBaseModelError          made for another base model
    │       └── CorruptAdapterError          a stored adapter fails its recorded sha256
    ├── DataError(ValueError)                a task data file or folder is unusable (names path, field)
    │   ├── NoDataError(FileNotFoundError)   no task data where capplug looked (names the places)
    │   ├── UnknownTaskError(KeyError)       no task of that name in the pool (or several)
    │   └── BigBenchArchiveError             the BIG-bench archive or its cache is unreadable
    ├── RowError(ValueError)                 rows of a data file are unusable (listed by number)
    ├── UpstreamHTTPError                    an upstream answered with an HTTP error
    ├── AttemptsSpent                        a request's upstream attempts are spent
    ├── AdapterStoreError                    the adapter store cannot do what was asked
    │   ├── UnknownAdapterError(KeyError)    no adapter with that id
    │   ├── UnknownAdapterFileError(LookupError)  an adapter has no file of that name
    │   ├── RefusedAdapterFileError          an adapter's file is a link or not a regular file
    │   ├── AdapterNameError(ValueError)     not a usable adapter name
    │   ├── AdapterNameTakenError            another adapter has that name already
    │   └── NoGeneratorError                 an adapter was needed and nothing can make one
    ├── ProbeError(RuntimeError)             the judged fallback could make no probe to check on
    └── FeedbackError(ValueError)            a selection or judgement that cannot be stored
        ├── UnknownSelectionError(LookupError)  no selection with that id
        └── DuplicateFeedbackError           the same judgement is already stored

    UnsupportedEncoder(CapplugError, RuntimeError)  a folder ONNX export cannot take (a fallback
                                                    signal: the PyTorch encoder is used instead)
    TruncationWarning(UserWarning)           an input was longer than a model's ``max_length``

Each is also importable from the module that raises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "RETRYABLE_STATUS",
    "AdapterFileError",
    "AdapterNameError",
    "AdapterNameTakenError",
    "AdapterStoreError",
    "AttemptsSpent",
    "BigBenchArchiveError",
    "CapplugError",
    "CheckpointError",
    "CorruptAdapterError",
    "DataError",
    "DuplicateFeedbackError",
    "FeedbackError",
    "ModelNotFoundError",
    "NoDataError",
    "NoGeneratorError",
    "PackageFetchError",
    "ProbeError",
    "RefusedAdapterFileError",
    "RowError",
    "TruncationWarning",
    "UnknownAdapterError",
    "UnknownAdapterFileError",
    "UnknownSelectionError",
    "UnknownTaskError",
    "UnsupportedEncoder",
    "UpstreamHTTPError",
    "WrongBaseModelError",
]

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
"""HTTP statuses worth another attempt (any other 5xx is too)."""


class CapplugError(Exception):
    """Base class of capplug's own errors."""


class ModelNotFoundError(CapplugError, LookupError):
    """A model reference names no local folder, Hugging Face repository or packaged model."""


class PackageFetchError(CapplugError, RuntimeError):
    """A packaged model or data set could not be fetched from the package registry."""


class CheckpointError(CapplugError, ValueError):
    """A checkpoint is unusable for the job (wrong head, unknown score mapping, unsafe format)."""


class AdapterFileError(CheckpointError):
    """An adapter folder is missing a file, is truncated or corrupt, or does not fit the model."""


class WrongBaseModelError(AdapterFileError):
    """An adapter was made for another base model than the one it is being attached to."""


class CorruptAdapterError(AdapterFileError):
    """A stored adapter's files are missing or do not match the sha256 the index recorded."""


class DataError(CapplugError, ValueError):
    """A task data file or folder is unusable; the message names the path (and the field)."""


class NoDataError(DataError, FileNotFoundError):
    """No task data was found; the message names the places looked in and how to give some."""


class UnknownTaskError(DataError, KeyError):
    """No task of that name is in the pool, or a bare name fits several (the message lists them)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BigBenchArchiveError(DataError):
    """The BIG-bench archive or its extracted cache is unreadable or lacks a task."""


class RowError(CapplugError, ValueError):
    """Some rows of a data file are unusable; the message lists them by row number."""

    MAX_REPORTED = 20
    """Problems listed in the message; ``problems`` holds them all."""

    def __init__(self, path: Path | str, problems: list[str], total: int) -> None:
        limit = self.MAX_REPORTED
        shown = "\n".join(f"  {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{path}: {len(problems)} of {total} rows are unusable:\n{shown}{more}")
        self.problems = problems


class UpstreamHTTPError(CapplugError):
    """An upstream HTTP answer that is an error, for code that speaks plain HTTP.

    ``status`` is the HTTP status (0 for a body that could not be used); ``retry_after`` the
    server's requested wait in seconds, when it gave one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"upstream answered {status}: {message}" if status else message)
        self.status = status
        self.retry_after = retry_after
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUS or self.status >= 500


class AttemptsSpent(CapplugError):
    """A call was not attempted: its request's attempt budget is spent
    (:class:`capplug.llms.retry.AttemptBudget`).

    ``last`` is the failure that spent it (the error worth reporting), when there was one.
    """

    def __init__(self, failed: int, limit: int, last: BaseException | None) -> None:
        shown = ""
        if last is not None:
            text = str(last)
            shown = f" (last: {text if len(text) <= 200 else text[:197] + '...'})"
        super().__init__(
            f"no attempt left: {failed} of the request's {limit} upstream attempts failed{shown}"
        )
        self.last = last


class AdapterStoreError(CapplugError):
    """The adapter store cannot do what was asked (see the message for why and the fix)."""


class UnknownAdapterError(AdapterStoreError, KeyError):
    """No adapter with that id is in the store (for this base model)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownAdapterFileError(AdapterStoreError, LookupError):
    """An adapter has no file of that name: a stored adapter has two, ``adapter_model.safetensors``
    and ``adapter_config.json``."""


class RefusedAdapterFileError(AdapterStoreError):
    """An adapter's file is not read: it, or its folder, is a link, or it is not a regular file
    directly in its adapter's folder in the store."""


class AdapterNameError(AdapterStoreError, ValueError):
    """Not a usable adapter name: 1 to 64 letters, digits, ``.``, ``_`` or ``-``, starting with a
    letter or digit, and not 16 hex characters (an adapter id)."""


class AdapterNameTakenError(AdapterStoreError):
    """Another adapter in the store has that name already (names are unique per store)."""


class NoGeneratorError(AdapterStoreError):
    """A new adapter was needed but the store has no generator to make one.

    ``set_aside`` names the stored hits found corrupt (or without their files) on the way: they
    were dropped from the index and their folders moved to ``<root>/.corrupt/``.
    """

    def __init__(self, message: str, *, set_aside: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.set_aside = tuple(set_aside)


class ProbeError(CapplugError, RuntimeError):
    """The judged fallback could make no probe for an instruction: the base model wrote an empty
    input (give one: an example input of the task)."""


class FeedbackError(CapplugError, ValueError):
    """A selection or judgement that cannot be stored (the message names the field, and
    ``param`` is that field when there is one)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownSelectionError(FeedbackError, LookupError):
    """No selection with that id is recorded."""


class DuplicateFeedbackError(FeedbackError):
    """The same judgement of the same selection is already stored."""


class UnsupportedEncoder(CapplugError, RuntimeError):
    """The folder is not a mean-pooling sentence encoder that the ONNX export can take."""


class TruncationWarning(UserWarning):
    """An input was longer than a model's ``max_length`` and was cut (the scorer's
    (instruction, response) pairs, the hypernetwork's instructions)."""
