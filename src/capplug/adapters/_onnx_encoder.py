"""A mean-pooling sentence encoder run by onnxruntime: the same vectors, about twice as fast on CPU.

The adapter store embeds one instruction per lookup, where PyTorch's per-call overhead dominates a
6-layer MiniLM; onnxruntime runs the same graph in about half the time. The transformer is
exported once per encoder folder into capplug's cache (``$CAPPLUG_HOME/onnx``), checked against
PyTorch on probe texts before it is used, and reused from then on (running it needs only
onnxruntime, which Chroma already installs; exporting also needs the ``onnx`` package).

Only the plain sentence-transformers layout is handled: a transformer, mean pooling over the
attention mask, then (optionally) unit length. Anything else raises :class:`UnsupportedEncoder`
and the caller keeps the PyTorch encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from capplug._cache import cache_home, lock_for, sha256_file
from capplug.errors import UnsupportedEncoder

logger = logging.getLogger(__name__)

PROBES = (
    "Translate the sentence into French, keeping names unchanged.",
    "In this task you classify the sentiment of a product review as positive or negative.",
    "Q",
)
MIN_COSINE = 0.9999
"""Each probe's ONNX embedding must match PyTorch's at least this closely, else ONNX is not used."""


def _layout(folder: Path) -> tuple[int, bool]:
    """``(max_seq_length, normalize)`` of a mean-pooling sentence-transformers folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise UnsupportedEncoder(f"{folder} has no modules.json")
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise UnsupportedEncoder(f"{folder}: modules {kinds} are not transformer + pooling")
    pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise UnsupportedEncoder(f"{folder}: pooling {modes} is not mean pooling")
    config_file = folder / "sentence_bert_config.json"
    settings = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return int(settings.get("max_seq_length") or 512), "Normalize" in kinds


def _fingerprint(folder: Path) -> str:
    """The encoder's identity by content, so every install of the same weights shares one export."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{name}:{sha256_file(folder / name)}".encode())
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


class OnnxSentenceEncoder:
    """``encode(texts)`` like sentence-transformers, on onnxruntime's CPU provider."""

    def __init__(self, folder: str | os.PathLike[str], *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UnsupportedEncoder("onnxruntime is not installed") from exc
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.max_length, self.normalize = _layout(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        path = cache_home() / "onnx" / f"{self.folder.name}-{_fingerprint(self.folder)}.onnx"
        with lock_for(f"onnx-{path.stem}"):
            if not path.is_file():
                self._export(path)
        options = ort.SessionOptions()
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        options.intra_op_num_threads = max(1, threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _export(self, path: Path) -> None:
        """Export the transformer and keep it only if it reproduces PyTorch on the probes."""
        import torch
        from transformers import AutoModel

        try:
            import onnx  # noqa: F401 - the exporter needs it
        except ImportError as exc:
            raise UnsupportedEncoder("exporting to ONNX needs the onnx package") from exc
        model = AutoModel.from_pretrained(
            self.folder, local_files_only=True, use_safetensors=True
        ).eval()

        class Hidden(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                out = self.inner(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                )
                return out.last_hidden_state

        wrapper = Hidden(model).eval()
        sample = self._tokenize(list(PROBES[:2]), "pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with torch.inference_mode(False), torch.no_grad():
                torch.onnx.export(
                    wrapper,
                    tuple(sample[n] for n in names),
                    str(tmp),
                    input_names=names,
                    output_names=["last_hidden_state"],
                    dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names},
                    opset_version=17,
                    dynamo=False,
                )
            model.eval()  # the exporter may leave the module in training mode
            self._check(tmp, model)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _check(self, candidate: Path, model: Any) -> None:
        import onnxruntime as ort
        import torch

        session = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
        batch = self._tokenize(list(PROBES), "np")
        feeds = {i.name: batch[i.name] for i in session.get_inputs()}
        exported = self._pool(session.run(None, feeds)[0], batch["attention_mask"])
        with torch.no_grad():
            hidden = model(**self._tokenize(list(PROBES), "pt")).last_hidden_state.numpy()
        reference = self._pool(hidden, batch["attention_mask"])
        cosine = (exported * reference).sum(1) / (
            np.linalg.norm(exported, axis=1) * np.linalg.norm(reference, axis=1)
        )
        if float(cosine.min()) < MIN_COSINE:
            raise UnsupportedEncoder(
                f"the ONNX export of {self.folder} differs from PyTorch (cosine {cosine.min():.5f})"
            )

    def _tokenize(self, texts: list[str], kind: str) -> Any:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors=kind,
            return_token_type_ids=True,
        )
        if kind == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in batch.items()}
        return batch

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        weights = mask[..., None].astype(np.float32)
        vectors = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
        if self.normalize:
            vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return vectors.astype(np.float32)

    def encode(self, texts: list[str], *, batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self._tokenize(texts[start : start + batch_size], "np")
            feeds = {k: v for k, v in batch.items() if k in self.inputs}
            out.append(self._pool(self.session.run(None, feeds)[0], batch["attention_mask"]))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
