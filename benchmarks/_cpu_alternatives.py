"""CPU paths measured and left out of capplug: int8 dynamic quantisation (PyTorch) and ONNX
Runtime (float32 and int8). ``scoring_speed --alternatives`` times them beside the others.

Each is a function ``pairs -> scores`` built on the float32 scorer's own tokenising and
batching, so only the forward pass differs.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capplug import Scorer
from capplug.scoring.precision import route_linears_to_onednn, unroute_linears

Pairs = list[tuple[str, str]]


def torch_int8(exact: Scorer) -> Callable[[Pairs], np.ndarray]:
    model = _plain_copy(exact)
    quantised = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def forward(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        return quantised(**inputs).logits[:, 0].float().numpy()

    return _scoring(exact, forward)


def onnx_runtime(exact: Scorer, *, int8: bool) -> Callable[[Pairs], np.ndarray]:
    import onnxruntime as ort

    folder = Path(tempfile.mkdtemp(prefix="capplug-onnx-"))
    path = _export(exact, folder / "scorer.onnx")
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(folder / "int8.onnx"), weight_type=QuantType.QInt8)
        path = folder / "int8.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def forward(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
        return session.run(None, feeds)[0][:, 0]

    return _scoring(exact, forward)


def _export(exact: Scorer, path: Path) -> Path:
    model = _plain_copy(exact)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if exact._uses_type_ids else [])

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, args, strict=True))).logits

    sample = exact.collate(exact.encode(["a probe instruction"] * 2, ["one", "two words"]))
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            Logits(model).eval(),
            tuple(sample[n] for n in names),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names},
            opset_version=17,
            dynamo=False,
        )
    return path


def _plain_copy(exact: Scorer) -> torch.nn.Module:
    """A copy of the float32 model with torch's own ``Linear.forward`` (not the oneDNN route)."""
    model = copy.deepcopy(unroute_linears(exact.model))
    route_linears_to_onednn(exact.model)
    return model


def _scoring(exact: Scorer, forward: Callable[[Any], np.ndarray]) -> Callable[[Pairs], np.ndarray]:
    def score(pairs: Pairs) -> np.ndarray:
        encoded = exact.encode([a for a, _ in pairs], [b for _, b in pairs])
        out = np.empty(len(pairs), dtype=np.float32)
        with torch.inference_mode():
            for batch in exact.batches(encoded):
                logits = forward(exact.collate([encoded[i] for i in batch]))
                out[batch] = 1.0 / (1.0 + np.exp(-logits))
        return out

    return score
