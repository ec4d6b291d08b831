"""The adapter store's checks of what callers give it: ids, instructions, base models, LoRA
configs, thresholds and limits. Each raises with the fix in its message."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from capplug.adapters.store.records import SOURCES, Source
from capplug.chat import blank
from capplug.errors import AdapterNameError, TruncationWarning, UnknownAdapterError
from capplug.models.adapter_folder import WrongBaseModelError, canonical_model_name

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_ID = re.compile(r"^[0-9a-f]{16}$")
"""An adapter's id: 16 lowercase hex characters (also the name of its folder)."""
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""An adapter's name: 1 to 64 letters, digits, ``.``, ``_`` or ``-``, from a letter or digit."""


def check_instruction(instruction: Any, max_chars: int) -> str:
    """The instruction, stripped and cut to ``max_chars`` (with a warning that points at the
    caller of the store's public method)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string; got {type(instruction).__name__}")
    text = instruction.strip()
    if blank(text):
        raise ValueError(
            "instruction is empty; give the task's instruction, e.g. 'Answer the question "
            "with yes or no.'"
        )
    if len(text) > max_chars:
        warnings.warn(
            f"instruction has {len(text)} characters; the adapter store keeps the first "
            f"{max_chars} (max_instruction_chars) and matches on those",
            TruncationWarning,
            stacklevel=3,
        )
        text = text[:max_chars].rstrip()
    return text


def check_id(adapter_id: Any) -> str:
    # Exactly the id: an id with a newline or spaces around it (``ID%0A`` in a URL) is not
    # an id, however forgiving that would look on a command line (the CLI strips its own).
    if not isinstance(adapter_id, str) or not ADAPTER_ID.fullmatch(adapter_id):
        raise UnknownAdapterError(
            f"{adapter_id!r} is not an adapter id (16 lowercase hex characters, as "
            f"`capplug store list` shows)"
        )
    return adapter_id


def check_name(name: Any) -> str:
    """A name an adapter may be given: :data:`ADAPTER_NAME`, and not an id (16 hex characters,
    which would be read as one)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise AdapterNameError(
            f"{shown} is not an adapter name: use 1 to 64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, e.g. 'sql-lora'"
        )
    if re.fullmatch(r"[0-9a-fA-F]{16}", name):
        raise AdapterNameError(
            f"{name!r} looks like an adapter id (16 hex characters); pick a name that does not, "
            f"e.g. 'lora-{name[:6]}'"
        )
    return name


def is_name(value: Any) -> bool:
    """Whether ``value`` could be an adapter's name (:func:`check_name` would take it)."""
    try:
        check_name(value)
    except AdapterNameError:
        return False
    return True


def check_base(recorded: str, base_model: str, *, where: str) -> None:
    """Refuse an adapter made for another base model than the store's ``base_model``."""
    if canonical_model_name(recorded).casefold() != base_model.casefold():
        raise WrongBaseModelError(
            f"the adapter {where} was made for {canonical_model_name(recorded)}, but this "
            f"store holds adapters for {base_model}; open a store with "
            f"base_model={recorded!r} for it"
        )


def lora_config(config: Any, base_model: str) -> LoraConfig:
    """A peft ``LoraConfig`` (or its dict) as the store writes it: for ``base_model``."""
    from peft import LoraConfig, PeftConfig

    if isinstance(config, PeftConfig):
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig; got {type(config).__name__}")
        data = config.to_dict()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise TypeError(
            f"config must be a peft LoraConfig or its dict; got {type(config).__name__}"
        )
    peft_type = str(data.pop("peft_type", "LORA")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise ValueError(f"config describes a {peft_type} adapter; the store keeps LoRA ones")
    recorded = data.get("base_model_name_or_path")
    if recorded:
        check_base(str(recorded), base_model, where="config")
    data["base_model_name_or_path"] = base_model
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    try:
        return LoraConfig(**data)
    except TypeError as exc:
        raise ValueError(f"config is not a LoraConfig peft accepts: {exc}") from exc


def targets(value: Any) -> tuple[str, ...]:
    """A LoRA config's target modules as the record keeps them (sorted)."""
    if isinstance(value, str):
        return (value,)
    return tuple(sorted(value or ()))


def check_threshold(value: Any, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1]; got NaN")
    return float(value)


def check_limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
    return value


def check_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ValueError(f"k must be an integer from 1 to 1000; got {value!r}")
    return value


def check_source(value: Any) -> Source:
    if value not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {value!r}")
    return value
