"""Instruction-to-adapter: LoRA adapters for a local model, trained per task or written from text.

- :class:`AdapterRuntime`: one local model with many named peft adapters (LRU-capped), batched
  generation where each prompt picks its adapter;
- :func:`train_task_lora` / :func:`train_all`: teacher LoRAs on Natural-Instructions train tasks;
- :class:`Hypernetwork`: instruction text -> LoRA weights in one forward pass;
- :func:`train_hypernetwork`: TAGI's objective (prediction + distillation + weight matching);
- :func:`read_adapter` / :func:`write_peft_folder`: the standard peft folder, checked before use.

Needs peft: ``pip install 'capplug[adapters]'``.
"""

from __future__ import annotations

try:
    import peft as _peft  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("capplug.adapters needs peft: pip install 'capplug[adapters]'") from exc

from capplug.adapters._examples import user_prompt
from capplug.adapters.adapter_folder import (
    AdapterFileError,
    AdapterFiles,
    BaseModelIdentity,
    WrongBaseModelError,
    canonical_model_name,
    model_identity,
    read_adapter,
    write_peft_folder,
)
from capplug.adapters.hypernetwork import DEFAULT_HYPERNETWORK, Hypernetwork, HypernetworkConfig
from capplug.adapters.lora import (
    LoraTrainConfig,
    LoraTrainResult,
    train_all,
    train_task_lora,
    train_task_names,
)
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.train_hypernet import (
    HypernetTrainConfig,
    HypernetTrainResult,
    find_teachers,
    train_hypernetwork,
)

__all__ = [
    "DEFAULT_HYPERNETWORK",
    "AdapterFileError",
    "AdapterFiles",
    "AdapterRuntime",
    "BaseModelIdentity",
    "HypernetTrainConfig",
    "HypernetTrainResult",
    "Hypernetwork",
    "HypernetworkConfig",
    "LoraTrainConfig",
    "LoraTrainResult",
    "WrongBaseModelError",
    "canonical_model_name",
    "find_teachers",
    "model_identity",
    "read_adapter",
    "train_all",
    "train_hypernetwork",
    "train_task_lora",
    "train_task_names",
    "user_prompt",
    "write_peft_folder",
]
