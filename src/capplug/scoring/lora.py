"""Scorers adapted to one task, kept as a LoRA over the scorer they started from.

A task scorer changes every linear layer of the encoder (attention, feed-forward, pooler and
the one-logit head) by a low-rank term ``scaling * B @ A``: for MiniLM at rank 8 that is 340k
numbers, a 1.3 MB file against the 90 MB checkpoint a full fine-tune writes. On disk it is a
standard peft LoRA folder (``adapter_config.json`` with ``base_model_name_or_path`` naming the
starting scorer, ``adapter_model.safetensors`` with ``capplug_kind = scorer`` and the base's
identity in its header), so the adapter store keeps and checks it like any other adapter.

Training adds the factors as torch parametrizations (:func:`add_lora`): the starting weights
stay frozen and only the factors learn. Scoring never runs the factors:
:meth:`Scorer.with_lora <capplug.scoring.Scorer.with_lora>` builds a second scorer whose
adapted weights are merged once and which shares every other tensor with the first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.utils import parametrize

from capplug.models.adapter_folder import (
    ADAPTER_CONFIG,
    META_BASE_ARCHITECTURE,
    META_BASE_MODEL,
    AdapterFiles,
    peft_key,
    write_peft_folder,
)

if TYPE_CHECKING:
    from capplug.scoring.model import Scorer

__all__ = [
    "KIND",
    "LORA_TARGETS",
    "META_KIND",
    "add_lora",
    "is_lora_folder",
    "lora_alpha",
    "lora_factors",
    "merge_lora",
    "merged_weights",
    "set_lora_factors",
    "write_lora",
]

LORA_TARGETS = ("query", "key", "value", "dense", "classifier")
"""The linear layers a task scorer adapts (by the last part of their module path): every one
of a BERT-style encoder, so the head can move too."""
META_KIND = "capplug_kind"
KIND = "scorer"
"""``capplug_kind`` in a task scorer's safetensors header (LLM adapters carry none)."""


class LowRank(torch.nn.Module):
    """``W -> W + scaling * B @ A``: a LoRA term on a linear layer's weight, for training.

    ``B`` starts at zero, so the adapted scorer starts as the one it adapts (as in peft)."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))
        self.scaling = scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling


def add_lora(
    model: torch.nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = LORA_TARGETS,
) -> list[str]:
    """Add a trainable LoRA term to every linear layer of ``model`` named in ``targets`` and
    freeze every other weight; returns the adapted module paths.

    ``alpha`` defaults to ``2 * rank`` (scaling 2). The factors draw from torch's global
    generator: seed it first for a repeatable run."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
    scaling = (2.0 * rank if alpha is None else float(alpha)) / rank
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] in targets:
            term = LowRank(module.weight, rank, scaling).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", term)
            adapted.append(name)
    if not adapted:
        raise ValueError(f"the model has no linear layer named {list(targets)} to adapt")
    return adapted


def _terms(model: torch.nn.Module) -> dict[str, LowRank]:
    terms = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for term in module.parametrizations["weight"]:
                if isinstance(term, LowRank):
                    terms[name] = term
    return terms


def lora_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained factors by their peft keys (float32 copies on the CPU)."""
    factors = {}
    for name, term in _terms(model).items():
        factors[peft_key(name, "A")] = term.lora_A.detach().float().cpu().clone()
        factors[peft_key(name, "B")] = term.lora_B.detach().float().cpu().clone()
    return factors


def set_lora_factors(model: torch.nn.Module, factors: Mapping[str, torch.Tensor]) -> None:
    """Load factors (as :func:`lora_factors` gives them) back into the model's LoRA terms."""
    with torch.no_grad():
        for name, term in _terms(model).items():
            term.lora_A.copy_(factors[peft_key(name, "A")])
            term.lora_B.copy_(factors[peft_key(name, "B")])


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA term into its weight and take the parametrizations out."""
    for name in _terms(model):
        module = model.get_submodule(name)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def lora_alpha(model: torch.nn.Module) -> float:
    """The ``lora_alpha`` of the model's LoRA terms (``scaling * rank``)."""
    term = next(iter(_terms(model).values()), None)
    if term is None:
        raise ValueError("the model has no LoRA terms")
    return term.scaling * term.lora_A.shape[0]


def write_lora(
    factors: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    *,
    alpha: float,
    base_name: str,
    architecture: str,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write LoRA factors (as :func:`lora_factors` gives them) as a peft folder for the scorer
    ``base_name``, marked as a task scorer; ``metadata`` joins the safetensors header."""
    from peft import LoraConfig

    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in factors})
    if not modules:
        raise ValueError("no LoRA factors to write")
    rank = int(factors[peft_key(modules[0], "A")].shape[0])
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in modules}),
        bias="none",
        base_model_name_or_path=base_name,
    )
    header = {
        **(metadata or {}),
        META_KIND: KIND,
        META_BASE_MODEL: base_name,
        META_BASE_ARCHITECTURE: architecture,
    }
    return write_peft_folder(factors, config, folder, metadata=header)


def is_lora_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a LoRA adapter (a task scorer) rather than a checkpoint."""
    path = Path(folder)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def merged_weights(scorer: Scorer, files: AdapterFiles) -> dict[str, torch.Tensor]:
    """``{state-dict key: weight + scaling * B @ A}`` of every module ``files`` adapts, computed
    in float32 from the scorer's weights as they are."""
    state = scorer.model.state_dict()
    scaling = files.scaling
    merged = {}
    for module in files.modules:
        key = f"{module}.weight"
        a, b = files.factors(module)
        weight = state[key].float()
        merged[key] = weight + (b.float().to(weight.device) @ a.float().to(weight.device)) * scaling
    return merged
