"""Training: the scorer, the teacher LoRAs and the hypernetwork, through one resumable loop.

- :mod:`capplug.training.loop`: :class:`~capplug.training.loop.Loop`, the one loop they share
  (checkpoints, warm-up and decay, accumulation, precision, the JSON log, progress);
- :mod:`capplug.training.scorer`: :func:`train_scorer` (weak labels, or a user's own data);
- :mod:`capplug.training.teacher_lora`: :func:`train_task_lora` and :func:`train_all`, one peft
  LoRA per train task of the task pool (needs peft);
- :mod:`capplug.training.hypernetwork`: :func:`train_hypernetwork`, instruction text to LoRA
  weights (needs peft).

Only capplug's own models are trained; no gradient ever reaches a served LLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and the layout test follow; imported on first use below
    from capplug.training.hypernetwork import (
        HypernetTrainConfig,
        HypernetTrainResult,
        find_teachers,
        train_hypernetwork,
    )
    from capplug.training.scorer import (
        TrainConfig,
        TrainResult,
        format_metrics,
        split_heldout,
        train_scorer,
    )
    from capplug.training.teacher_lora import (
        LoraTrainConfig,
        LoraTrainResult,
        train_all,
        train_multitask_lora,
        train_task_lora,
    )

_EXPORTS = {
    "TrainConfig": "scorer",
    "TrainResult": "scorer",
    "format_metrics": "scorer",
    "split_heldout": "scorer",
    "train_scorer": "scorer",
    "LoraTrainConfig": "teacher_lora",
    "LoraTrainResult": "teacher_lora",
    "train_all": "teacher_lora",
    "train_multitask_lora": "teacher_lora",
    "train_task_lora": "teacher_lora",
    "HypernetTrainConfig": "hypernetwork",
    "HypernetTrainResult": "hypernetwork",
    "find_teachers": "hypernetwork",
    "train_hypernetwork": "hypernetwork",
}

__all__ = [
    "HypernetTrainConfig",
    "HypernetTrainResult",
    "LoraTrainConfig",
    "LoraTrainResult",
    "TrainConfig",
    "TrainResult",
    "find_teachers",
    "format_metrics",
    "split_heldout",
    "train_all",
    "train_hypernetwork",
    "train_multitask_lora",
    "train_scorer",
    "train_task_lora",
]


def __getattr__(name: str) -> Any:
    # Imported on first use, so the scorer's training never loads peft.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'capplug.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"capplug.training.{module}"), name)


def __dir__() -> list[str]:
    return __all__
