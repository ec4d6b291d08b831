"""Fakes for the adapter-store tests, importable by worker processes too (no test collected here)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from chromadb.api.types import (
    DefaultEmbeddingFunction,
    Documents,
    EmbeddingFunction,
    Embeddings,
    Space,
)
from chromadb.utils.embedding_functions import register_embedding_function
from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

from capplug.adapters.store import AdapterStore

TARGETS = ["q_proj", "v_proj"]
RANK = 4


@register_embedding_function
class WordHashEmbedding(EmbeddingFunction[Documents]):
    """Bag-of-words hashed into ``dim`` buckets, unit length: shared words mean similar texts."""

    calls: ClassVar[int] = 0
    """Texts embedded in this process, across instances."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def __call__(self, input: Documents) -> Embeddings:
        type(self).calls += len(input)
        out = []
        for text in input:
            vector = np.zeros(self.dim, dtype=np.float32)
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            out.append(vector / max(float(np.linalg.norm(vector)), 1e-9))
        return out

    @staticmethod
    def name() -> str:
        return "capplug_test_word_hash"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine"]

    def get_config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> WordHashEmbedding:
        return WordHashEmbedding(config["dim"])


class FakeGenerator:
    """Random LoRA factors of the right shapes, seeded by the instruction; logs every call."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        base_model: str,
        *,
        log: str | os.PathLike[str] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.shapes = dict(shapes)
        self.base_model = base_model
        self.log = log
        self.delay = delay
        self.calls: list[str] = []

    def __call__(self, instruction: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.calls.append(instruction)
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(instruction + "\n")
        if self.delay:
            time.sleep(self.delay)
        seed = int(hashlib.sha256(instruction.encode()).hexdigest()[:8], 16)
        generator = torch.Generator().manual_seed(seed)
        state = {k: torch.randn(s, generator=generator) * 0.01 for k, s in self.shapes.items()}
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "target_modules": TARGETS,
            "base_model_name_or_path": self.base_model,
            "task_type": "CAUSAL_LM",
        }
        return state, config


def worker(
    root: str,
    base_model: str,
    shapes: dict[str, tuple[int, ...]],
    log: str,
    instructions: list[str],
    barrier: Any,
    results: Any,
) -> None:
    """One process of the concurrency test: get_or_create each instruction, report the results."""
    try:
        store = AdapterStore(
            root,
            base_model=base_model,
            embedding_function=WordHashEmbedding(),
            generator=FakeGenerator(shapes, base_model, log=log, delay=0.3),
        )
        barrier.wait(timeout=60)
        out = []
        for text in instructions:
            result = store.get_or_create(text)
            out.append((text, result.record.id, result.hit))
        store.close()
        results.put(("ok", out))
    except BaseException as exc:  # report, so the parent fails with the reason
        results.put(("error", f"{type(exc).__name__}: {exc}"))


@pytest.fixture(autouse=True)
def no_chroma_default_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test in which Chroma's default (downloading) embedding function is made or used."""

    message = "Chroma's default embedding function (an ONNX model it downloads) was used"

    def refuse_init(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(message)

    def refuse_call(self: object, input: object) -> None:  # Chroma checks this signature
        raise AssertionError(message)

    monkeypatch.setattr(DefaultEmbeddingFunction, "__init__", refuse_init)
    monkeypatch.setattr(DefaultEmbeddingFunction, "__call__", refuse_call)
    monkeypatch.setattr(ONNXMiniLM_L6_V2, "__init__", refuse_init)


def fake_indexed_store(root: Path, base: str) -> None:
    """Make the store's collection with the test embedder, so the CLI reopens it with that."""
    AdapterStore(root, base_model=base, embedding_function=WordHashEmbedding()).close()
