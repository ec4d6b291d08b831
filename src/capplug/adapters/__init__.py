"""Instruction-to-adapter: LoRA adapters for a local model, trained per task or written from text.

- :class:`AdapterRuntime`: one local model with many named peft adapters (LRU-capped), batched
  generation where each prompt picks its adapter;
- :class:`Hypernetwork`: instruction text -> LoRA weights in one forward pass (trained by
  :mod:`capplug.training`: teacher LoRAs on the task pool's train tasks, and TAGI's objective);
- :class:`AdapterStore`: adapters indexed in Chroma by instruction, reused for similar ones;
  :class:`ScorerHitCheck` checks a hit with the scorer before it is used;
- :class:`AdapterJudge`: the judged fallback: an adapter's answer against the bare base model's,
  judged by a selector; an adapter that lost is flagged in the store and not used;
- :class:`TaskScorers`: scorers adapted to one task (LoRAs over the scorer), kept in the same
  store as a second kind, found by instruction, used where the guard allowed;
- :func:`read_adapter` / :func:`write_peft_folder`: the standard peft folder, checked before use.

Needs peft: ``pip install 'capplug[adapters]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and the layout test follow; imported on first use below
    from capplug.adapters.examples import user_prompt
    from capplug.adapters.fallback import AdapterJudge, Comparison, ProbeError, with_definition
    from capplug.adapters.hit_check import HitCheckRecord, ScorerHitCheck
    from capplug.adapters.hypernetwork import DEFAULT_HYPERNETWORK, Hypernetwork, HypernetworkConfig
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.adapters.store import AdapterStore
    from capplug.adapters.task_scorers import TaskScorerChoice, TaskScorers
    from capplug.models.adapter_folder import (
        AdapterFileError,
        AdapterFiles,
        BaseModelIdentity,
        WrongBaseModelError,
        canonical_model_name,
        model_identity,
        read_adapter,
        write_peft_folder,
    )

_EXPORTS = {
    "user_prompt": "examples",
    "AdapterFileError": "capplug.models.adapter_folder",
    "AdapterFiles": "capplug.models.adapter_folder",
    "BaseModelIdentity": "capplug.models.adapter_folder",
    "WrongBaseModelError": "capplug.models.adapter_folder",
    "canonical_model_name": "capplug.models.adapter_folder",
    "model_identity": "capplug.models.adapter_folder",
    "read_adapter": "capplug.models.adapter_folder",
    "write_peft_folder": "capplug.models.adapter_folder",
    "DEFAULT_HYPERNETWORK": "hypernetwork",
    "Hypernetwork": "hypernetwork",
    "HypernetworkConfig": "hypernetwork",
    "AdapterRuntime": "runtime",
    "AdapterStore": "store",
    "AdapterJudge": "fallback",
    "Comparison": "fallback",
    "ProbeError": "fallback",
    "with_definition": "fallback",
    "TaskScorers": "task_scorers",
    "TaskScorerChoice": "task_scorers",
    "HitCheckRecord": "hit_check",
    "ScorerHitCheck": "hit_check",
}

__all__ = [
    "DEFAULT_HYPERNETWORK",
    "AdapterFileError",
    "AdapterFiles",
    "AdapterJudge",
    "AdapterRuntime",
    "AdapterStore",
    "BaseModelIdentity",
    "Comparison",
    "HitCheckRecord",
    "Hypernetwork",
    "HypernetworkConfig",
    "ProbeError",
    "ScorerHitCheck",
    "TaskScorerChoice",
    "TaskScorers",
    "WrongBaseModelError",
    "canonical_model_name",
    "model_identity",
    "read_adapter",
    "user_prompt",
    "with_definition",
    "write_peft_folder",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: `capplug adapters --help` and the store commands stay light, and a
    # missing peft is reported where it is needed.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'capplug.adapters' has no attribute {name!r}")
    try:
        path = module if "." in module else f"capplug.adapters.{module}"
        return getattr(importlib.import_module(path), name)
    except ImportError as exc:
        if exc.name in ("peft", "chromadb"):
            raise ImportError(
                f"capplug.adapters.{name} needs {exc.name}: pip install 'capplug[adapters]'"
            ) from exc
        raise


def __dir__() -> list[str]:
    return __all__
