"""Optimizer and RNG state as safetensors, for resumable training loops (nothing is unpickled).

Shared by the scorer's training and the adapters' training: each keeps its own file layout and
calls these for the part they have in common.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["optimizer_tensors", "restore_optimizer"]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, param_groups)``: the optimizer's state tensors and torch's RNG states as
    flat safetensors-ready tensors, and its JSON-able ``param_groups``."""
    opt = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().to("cpu").contiguous()
        for index, slot in opt["state"].items()
        for key, value in slot.items()
        if isinstance(value, torch.Tensor)
    }
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors, opt["param_groups"]


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], param_groups: Any
) -> None:
    """Load what :func:`optimizer_tensors` saved back into ``optimizer`` and torch's RNGs."""
    slots: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        index, name = key.split(".", 1)
        slots[int(index)][name] = value
    optimizer.load_state_dict({"state": dict(slots), "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
