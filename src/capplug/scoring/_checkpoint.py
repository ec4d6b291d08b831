"""Loading a scorer checkpoint: checks, the score mapping it records, its name and length."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch

from capplug._runtime import quiet_transformers
from capplug.errors import CheckpointError
from capplug.models import resolve

__all__ = [
    "SCORE_MAPPING_KEY",
    "ScoreMapping",
    "clamp_length",
    "load_checkpoint",
    "model_name",
    "recorded_mapping",
]

ScoreMapping: TypeAlias = Literal["sigmoid", "clip"]
"""How a raw logit becomes a score: ``sigmoid`` for checkpoints trained through a sigmoid
(capplug's own), ``clip`` to [0, 1] for raw regression heads (the original Cappy)."""

SCORE_MAPPING_KEY = "capplug_score_mapping"
"""The ``config.json`` field that records a checkpoint's :data:`ScoreMapping`."""

# Public checkpoints published without the field, whose training recipe fixes the mapping.
_KNOWN_MAPPINGS: dict[str, ScoreMapping] = {"btan2/cappy-large": "clip"}

# Model families whose position ids start after the padding index, costing positions.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text"}


def model_name(name: str | None, model: torch.nn.Module) -> str:
    from capplug.models.adapter_folder import canonical_model_name

    given = name or getattr(model.config, "_name_or_path", "") or "scorer"
    return canonical_model_name(given)


def load_checkpoint(
    ref: str | os.PathLike[str], score_mapping: ScoreMapping | None
) -> tuple[torch.nn.Module, Any, ScoreMapping]:
    """Model, tokenizer and score mapping of a single-logit checkpoint, checked first."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = resolve(ref)
    config = AutoConfig.from_pretrained(folder)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise CheckpointError(
            f"{ref} is a bare backbone ({', '.join(architectures) or config.model_type}) with no "
            f"scoring head; start one for training with Scorer.from_backbone({str(ref)!r})"
        )
    if config.num_labels != 1:
        raise CheckpointError(
            f"{ref} has a {config.num_labels}-label head; a scorer needs a single regression logit"
        )
    if not any(Path(folder).glob("*.safetensors")):
        raise CheckpointError(
            f"{ref} holds no .safetensors weights; capplug never loads pickled weights. "
            f"Convert it once with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    mapping = score_mapping or recorded_mapping(config, str(ref))
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer, mapping


def recorded_mapping(config: Any, ref: str) -> ScoreMapping:
    recorded = getattr(config, SCORE_MAPPING_KEY, None)
    if recorded in ("sigmoid", "clip"):
        return recorded
    if ref.lower() in _KNOWN_MAPPINGS:
        return _KNOWN_MAPPINGS[ref.lower()]
    # sentence-transformers records the activation its CrossEncoder applies.
    activation = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn", "")
    if activation.endswith("Sigmoid"):
        return "sigmoid"
    if activation.endswith("Identity"):
        return "clip"
    raise CheckpointError(
        f"{ref} does not record how its logit maps to [0, 1] ({SCORE_MAPPING_KEY} in config.json); "
        f"pass score_mapping='sigmoid' (trained through a sigmoid) or 'clip' (raw regression)"
    )


def clamp_length(max_length: int, config: Any, tokenizer: Any) -> int:
    if not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"max_length must be an integer >= 8; got {max_length!r}")
    limits = [max_length]
    positions = getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "position_embedding_type", "absolute") == "absolute":
        offset = (config.pad_token_id or 0) + 1 if config.model_type in _OFFSET_POSITIONS else 0
        limits.append(positions - offset)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits)
