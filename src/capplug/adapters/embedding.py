"""A Chroma embedding function over capplug's packaged sentence encoder (all-MiniLM-L6-v2).

The adapter store indexes instructions with it, and it is registered with Chroma under
:meth:`SentenceEncoderEmbeddingFunction.name`, so a collection persisted with it reopens with it
(``client.get_collection(name)`` rebuilds it from the stored config) once this module is
imported. It never falls back to Chroma's default embedding function, which downloads an ONNX
model: the encoder is a local folder (``capplug.models.resolve``), loaded on first use with
``local_files_only``, so nothing is fetched from a model hub.

    from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
    embed = SentenceEncoderEmbeddingFunction()          # the packaged MiniLM, on the CPU
    collection = client.get_or_create_collection("notes", embedding_function=embed)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, ClassVar, Literal

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

__all__ = ["DEFAULT_ENCODER", "SentenceEncoderEmbeddingFunction"]

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"
"""The packaged all-MiniLM-L6-v2 (384 wide), installed with capplug."""

_CONFIG_KEYS = {"model", "device", "batch_size", "precision", "backend"}
_PRECISIONS = ("auto", "fp32", "bf16")
Precision = Literal["auto", "fp32", "bf16"]
_BACKENDS = ("auto", "torch", "onnx")
Backend = Literal["auto", "torch", "onnx"]


@register_embedding_function
class SentenceEncoderEmbeddingFunction(EmbeddingFunction[Documents]):
    """Unit-length sentence embeddings from a local sentence-transformers model.

    Args:
        model: a sentence-transformers folder, a packaged name (default ``"minilm"``) or a
            Hugging Face id, resolved by :func:`capplug.models.resolve` when first needed.
        device: where the encoder runs (``"cpu"`` by default, so a persisted config works on any
            machine).
        batch_size: texts encoded per forward pass.
        precision: ``"bf16"`` runs the matrix products in bfloat16 (autocast; the weights stay
            float32): about 1.5x faster on CPUs with native bfloat16 (AVX512-BF16, AMX), with
            cosine similarity to the float32 embedding above 0.9999. ``"auto"`` (default) picks
            it on such CPUs and float32 elsewhere (PyTorch backend only).
        backend: ``"onnx"`` runs the encoder with onnxruntime (float32; about 2x faster per
            query on CPU), exported once into capplug's cache and checked against PyTorch before
            use; ``"torch"`` runs sentence-transformers; ``"auto"`` (default) uses ONNX on the CPU
            when the export works and PyTorch otherwise.
    """

    # One loaded encoder per (folder, device) in a process, shared by every instance.
    _encoders: ClassVar[dict[tuple[str, str], Any]] = {}
    _onnx_encoders: ClassVar[dict[str, Any]] = {}  # folder -> encoder, or None when unusable
    _load_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        precision: Precision = "auto",
        backend: Backend = "auto",
    ) -> None:
        self.validate_config(
            {
                "model": model,
                "device": device,
                "batch_size": batch_size,
                "precision": precision,
                "backend": backend,
            }
        )
        self.model = os.fspath(model)
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.backend = backend
        self._encoder: Any = None
        self._onnx: Any = None
        self._bf16 = False

    def __call__(self, input: Documents) -> Embeddings:
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            return []
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("documents to embed must be strings")
        onnx = self.onnx_encoder()
        if onnx is not None:
            return list(onnx.encode(texts, batch_size=self.batch_size))
        encoder = self.encoder()
        with self._autocast():
            vectors = encoder.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [np.asarray(v, dtype=np.float32) for v in vectors]

    def _autocast(self) -> Any:
        if not self._bf16:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def encoder(self) -> Any:
        """The sentence-transformers model, loaded on first use and shared across instances."""
        if self._encoder is not None:
            return self._encoder
        from capplug.models import resolve

        folder = str(resolve(self.model))
        key = (folder, self.device)
        with self._load_lock:
            encoder = self._encoders.get(key)
            if encoder is None:
                from sentence_transformers import SentenceTransformer

                encoder = SentenceTransformer(folder, device=self.device, local_files_only=True)
                self._encoders[key] = encoder.eval()
        self._bf16 = self.precision == "bf16" or (
            self.precision == "auto" and self.device == "cpu" and _cpu_has_bf16()
        )
        self._encoder = encoder
        return encoder

    def onnx_encoder(self) -> Any:
        """The onnxruntime encoder when the backend is (or resolves to) ONNX, else ``None``."""
        if self._onnx is not None or self.backend == "torch" or self.device != "cpu":
            return self._onnx
        from capplug.adapters._onnx_encoder import OnnxSentenceEncoder, UnsupportedEncoder
        from capplug.models import resolve

        folder = str(resolve(self.model))
        with self._load_lock:
            if folder not in self._onnx_encoders:
                try:
                    self._onnx_encoders[folder] = OnnxSentenceEncoder(folder)
                except UnsupportedEncoder as exc:
                    if self.backend == "onnx":
                        raise
                    logger.info("sentence encoder stays on PyTorch: %s", exc)
                    self._onnx_encoders[folder] = None
        self._onnx = self._onnx_encoders[folder]
        return self._onnx

    @property
    def dimension(self) -> int:
        """The embedding width (loads the encoder)."""
        return int(self.encoder().get_sentence_embedding_dimension())

    @staticmethod
    def name() -> str:
        return "capplug_sentence_encoder"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        # Unit-length vectors: cosine, inner product and L2 all rank neighbours the same way.
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "backend": self.backend,
        }

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> SentenceEncoderEmbeddingFunction:
        SentenceEncoderEmbeddingFunction.validate_config(config)
        return SentenceEncoderEmbeddingFunction(
            config["model"],
            device=config.get("device", "cpu"),
            batch_size=config.get("batch_size", 32),
            precision=config.get("precision", "auto"),
            backend=config.get("backend", "auto"),
        )

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        model = config.get("model")
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) or not model.strip():
            raise ValueError(
                f"model must name a sentence encoder (a folder, 'minilm' or a Hugging Face id); "
                f"got {model!r}"
            )
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown {SentenceEncoderEmbeddingFunction.name()} options {unknown}")
        device = config.get("device", "cpu")
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda'; got {device!r}")
        batch_size = config.get("batch_size", 32)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        precision = config.get("precision", "auto")
        if precision not in _PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}"
            )
        backend = config.get("backend", "auto")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}; got {backend!r}")

    def validate_config_update(
        self, old_config: dict[str, Any], new_config: dict[str, Any]
    ) -> None:
        if "model" in new_config and new_config["model"] != old_config.get("model"):
            raise ValueError(
                "changing the encoder changes the embedding space of every stored vector; "
                "index into a new collection instead"
            )


def _cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (else bfloat16 is slower than float32)."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False
