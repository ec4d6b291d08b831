"""The on-disk peft adapter folder: which base model it is for, checking it, reading and writing it.

A LoRA adapter is a standard peft folder: ``adapter_config.json`` (a :class:`peft.LoraConfig`
with ``base_model_name_or_path`` filled in) and ``adapter_model.safetensors`` with the keys
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``).
``PeftModel.from_pretrained`` loads it as it is, and so could vLLM.

capplug also writes its own facts into the safetensors header metadata (strings, so any
safetensors reader ignores them): ``capplug_base_model`` and ``capplug_base_architecture``, the
:class:`BaseModelIdentity` of the model the adapter was made for.

:func:`read_adapter` checks a folder completely before a single tensor reaches a model: the
config parses, the safetensors header is well formed and the file holds every byte it announces
(a truncated download is caught here), the adapter was made for this base model, and every
tensor's shape fits the module it adapts. Only then are the tensors read.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capplug._cache import share_like_umask
from capplug.errors import AdapterFileError, WrongBaseModelError

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFileError",
    "AdapterFiles",
    "BaseModelIdentity",
    "WrongBaseModelError",
    "canonical_model_name",
    "linear_shapes",
    "model_identity",
    "peft_key",
    "read_adapter",
    "write_peft_folder",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_BASE_MODEL = "capplug_base_model"
META_BASE_ARCHITECTURE = "capplug_base_architecture"

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class BaseModelIdentity:
    """What an adapter must match: the base model's name and the shape of its architecture.

    ``name`` is the Hugging Face id for hub and packaged models (the packaged SmolLM2 is
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` whichever way it was fetched) and the absolute folder
    path for any other local model. ``architecture`` lists the sizes that decide every weight
    shape, so two models that merely share a name still differ when their layers do.
    """

    name: str
    architecture: str

    def __str__(self) -> str:
        return f"{self.name} [{self.architecture}]"


def canonical_model_name(ref: str | os.PathLike[str]) -> str:
    """The name a model goes by in adapter files, whichever way ``ref`` spells it."""
    from capplug.models import MANIFEST, packaged_model

    text = os.fspath(ref).strip()
    spec = packaged_model(text)
    if spec is not None:
        return spec.hf_id
    path = Path(text).expanduser()
    if path.is_dir():
        path = path.resolve()
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                hf_id = json.loads(manifest.read_text(encoding="utf-8")).get("hf_id")
            except (OSError, ValueError):
                hf_id = None
            if isinstance(hf_id, str) and hf_id:
                return hf_id
        parts = path.parts
        # A Hugging Face cache snapshot: .../models--org--name/snapshots/<revision>
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3][len("models--") :].replace("--", "/")
        return str(path)
    return text


def architecture_signature(config: Any) -> str:
    """The sizes of a transformers config that decide the shape of every adapted weight."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (
        f"{getattr(config, 'model_type', '?')} layers={getattr(config, 'num_hidden_layers', '?')} "
        f"hidden={getattr(config, 'hidden_size', '?')} heads={heads}/{kv_heads} "
        f"vocab={getattr(config, 'vocab_size', '?')}"
    )


def model_identity(ref: str | os.PathLike[str], config: Any) -> BaseModelIdentity:
    """The identity of the model loaded from ``ref`` with this transformers ``config``."""
    return BaseModelIdentity(canonical_model_name(ref), architecture_signature(config))


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (in_features, out_features)}`` of every linear layer LoRA can adapt."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
            # transformers' GPT-2 style Conv1D stores its weight as [in, out].
            shapes[name] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
    return shapes


def peft_key(module: str, part: str) -> str:
    """The peft state-dict key of one LoRA factor: ``part`` is ``"A"`` or ``"B"``."""
    return f"base_model.model.{module}.lora_{part}.weight"


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter folder, read into memory."""

    folder: Path
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    """Tensors by their peft keys, on the CPU."""
    metadata: dict[str, str]
    """The safetensors header metadata (capplug writes the base model's identity there)."""

    @property
    def modules(self) -> list[str]:
        """The adapted module paths, in file order."""
        found = [m.group("module") for k in self.state_dict if (m := _KEY.match(k))]
        return list(dict.fromkeys(found))

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A [r, in], lora_B [out, r])`` of one adapted module."""
        return self.state_dict[peft_key(module, "A")], self.state_dict[peft_key(module, "B")]

    @property
    def scaling(self) -> float:
        """The factor peft multiplies ``B @ A`` by: ``lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA)."""
        r = self.config.r
        return self.config.lora_alpha / (math.sqrt(r) if self.config.use_rslora else r)


def read_adapter(
    folder: str | os.PathLike[str],
    *,
    identity: BaseModelIdentity | None = None,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> AdapterFiles:
    """Check an adapter folder completely, then read it; nothing is loaded into any model.

    Args:
        folder: a peft LoRA folder.
        identity: the base model it is meant for; an adapter made for another one is refused.
        shapes: the base model's :func:`linear_shapes`; every tensor must fit its module.

    Raises:
        AdapterFileError: a missing, truncated or corrupt file, a non-LoRA adapter, or a tensor
            that does not fit the base model.
        WrongBaseModelError: the adapter says it was made for another base model.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {str(path)!r} does not exist")
    config_path = path / ADAPTER_CONFIG
    weights_path = path / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise AdapterFileError(
            f"{path} holds no {ADAPTER_CONFIG}; an adapter folder is what peft's "
            f"save_pretrained or capplug's write_peft_folder writes"
        )
    if not weights_path.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise AdapterFileError(
            f"{path} holds no {ADAPTER_WEIGHTS}"
            + (
                "; it has adapter_model.bin, a pickle, which capplug never loads: re-save it "
                "with peft's save_pretrained(dir, safe_serialization=True)"
                if pickled
                else ""
            )
        )
    config = _read_config(config_path)
    header, metadata = _read_header(weights_path)
    if identity is not None:
        _check_identity(path, config, metadata, identity)
    _check_tensors(path, config, header, shapes, identity)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights_path} could not be read: {exc}") from exc
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{weights_path} is corrupt: {key} holds NaN or infinite values")
    return AdapterFiles(folder=path, config=config, state_dict=tensors, metadata=metadata)


def write_peft_folder(
    state_dict: Mapping[str, torch.Tensor],
    config: LoraConfig,
    out: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a standard peft LoRA folder that ``PeftModel.from_pretrained`` loads.

    The weights are written first and the config last, each to a temporary name renamed into
    place, so a folder with an ``adapter_config.json`` is always complete.

    Args:
        state_dict: tensors by peft key (``base_model.model.<module>.lora_A.weight``, ...).
        config: the LoRA config; its ``base_model_name_or_path`` must name the base model.
        out: the folder (created if needed; files already there are replaced).
        metadata: extra string facts for the safetensors header (capplug's base identity, ...).

    Raises:
        ValueError: no base model named, or keys that are not plain LoRA factors in pairs.
    """
    from safetensors.torch import save_file

    if not config.base_model_name_or_path:
        raise ValueError(
            "config.base_model_name_or_path must name the base model the adapter is for; "
            "set it before writing (capplug refuses adapters whose base it cannot check)"
        )
    if not state_dict:
        raise ValueError("state_dict is empty; an adapter needs at least one lora_A/lora_B pair")
    modules: dict[str, set[str]] = {}
    for key in state_dict:
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"state_dict key {key!r} is not a plain LoRA factor "
                f"(base_model.model.<module>.lora_A.weight or .lora_B.weight)"
            )
        modules.setdefault(match.group("module"), set()).add(match.group("part"))
    unpaired = sorted(m for m, parts in modules.items() if parts != {"A", "B"})
    if unpaired:
        raise ValueError(f"modules {unpaired[:3]} have lora_A without lora_B or the reverse")
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{ADAPTER_WEIGHTS}.", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        share_like_umask(tmp)  # mkstemp's 0600 would keep other users out
        os.replace(tmp, folder / ADAPTER_WEIGHTS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with tempfile.TemporaryDirectory(prefix=".adapter-config.", dir=folder) as staging:
        config.save_pretrained(staging)
        os.replace(Path(staging) / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    return folder


# ----------------------------------------------------------------------------------- checks


def _read_config(path: Path) -> LoraConfig:
    from peft import LoraConfig

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path} must hold a JSON object; got {type(raw).__name__}")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterFileError(
            f"{path} describes a {raw.get('peft_type') or 'typeless'} adapter; capplug's runtime "
            f"loads LoRA adapters (peft_type LORA)"
        )
    for option in ("use_dora", "use_qalora"):
        if raw.get(option):
            raise AdapterFileError(f"{path} sets {option}; capplug loads plain LoRA adapters only")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFileError(f"{path}: 'r' must be an integer >= 1; got {r!r}")
    try:
        config = LoraConfig.from_pretrained(str(path.parent))
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{path} is not a LoRA config peft accepts: {exc}") from exc
    return config


def _read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, checked against its size."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(
            f"{path} is truncated: {size} bytes, fewer than the 8 that announce the header"
        )
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length < 2 or length > _MAX_HEADER:
            raise AdapterFileError(
                f"{path} is not a safetensors file: its header length reads {length} bytes"
            )
        if 8 + length > size:
            raise AdapterFileError(
                f"{path} is truncated: its header announces {length} bytes but the file holds "
                f"{size - 8} after the length"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path} is corrupt: its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path} is corrupt: its __metadata__ is not an object")
    data_bytes = size - 8 - length
    end_of_data = 0
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise AdapterFileError(f"{where} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise AdapterFileError(f"{where} has unknown dtype {dtype!r}")
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ) or not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise AdapterFileError(f"{where} has a malformed shape or data_offsets")
        expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise AdapterFileError(
                f"{where} spans {offsets[1] - offsets[0]} bytes but a {dtype} tensor of shape "
                f"{shape} needs {expected}: the file is corrupt"
            )
        end_of_data = max(end_of_data, offsets[1])
    if end_of_data > data_bytes:
        raise AdapterFileError(
            f"{path} is truncated: its tensors need {end_of_data} bytes of data but only "
            f"{data_bytes} are there (an interrupted copy or download?); fetch or write it again"
        )
    return header, {str(k): str(v) for k, v in metadata.items()}


def _check_identity(
    path: Path, config: LoraConfig, metadata: Mapping[str, str], identity: BaseModelIdentity
) -> None:
    recorded = metadata.get(META_BASE_MODEL) or config.base_model_name_or_path
    where = f"{META_BASE_MODEL} in its weights" if metadata.get(META_BASE_MODEL) else ADAPTER_CONFIG
    if recorded and not _same_name(recorded, identity.name):
        raise WrongBaseModelError(
            f"adapter {path} was made for {recorded} ({where}), not for this base model "
            f"{identity.name}; load it on {recorded}, or make an adapter for {identity.name}"
        )
    architecture = metadata.get(META_BASE_ARCHITECTURE)
    if architecture and architecture != identity.architecture:
        raise WrongBaseModelError(
            f"adapter {path} was made for a {recorded or 'model'} with architecture "
            f"[{architecture}], not for this base model {identity}"
        )


def _same_name(recorded: str, name: str) -> bool:
    return canonical_model_name(recorded).casefold() == name.casefold()


def _check_tensors(
    path: Path,
    config: LoraConfig,
    header: Mapping[str, Mapping[str, Any]],
    shapes: Mapping[str, tuple[int, int]] | None,
    identity: BaseModelIdentity | None,
) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    base = identity.name if identity is not None else "the base model"
    ranks: dict[str, dict[str, list[int]]] = {}
    for key, entry in header.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFileError(
                f"{path}: {key!r} is not a plain LoRA factor (lora_A/lora_B of a linear layer); "
                f"capplug loads plain LoRA adapters only"
            )
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: {key} is {entry['dtype']}, not a float tensor")
        if len(entry["shape"]) != 2:
            raise AdapterFileError(f"{path}: {key} has shape {entry['shape']}, not a matrix")
        module, part = match.group("module"), match.group("part")
        ranks.setdefault(module, {})[part] = list(entry["shape"])
        if not check_target_module_exists(config, module):
            raise AdapterFileError(
                f"{path}: {key} adapts {module}, which its config's target_modules "
                f"({config.target_modules}) does not name: the files do not belong together"
            )
    if not ranks:
        raise AdapterFileError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    for module, parts in ranks.items():
        if set(parts) != {"A", "B"}:
            raise AdapterFileError(f"{path}: {module} has lora_{''.join(parts)} but not its pair")
        (r_a, fan_in), (fan_out, r_b) = parts["A"], parts["B"]
        if r_a != r_b or (not config.rank_pattern and r_a != config.r):
            raise AdapterFileError(
                f"{path}: {module} has lora_A of rank {r_a} and lora_B of rank {r_b}; "
                f"its config says r={config.r}"
            )
        if shapes is None:
            continue
        if module not in shapes:
            raise AdapterFileError(
                f"{path}: the adapter has weights for {module}, a linear layer {base} does not "
                f"have; it was made for another model"
            )
        want_in, want_out = shapes[module]
        if (fan_in, fan_out) != (want_in, want_out):
            raise AdapterFileError(
                f"{path}: {module} is {want_in} -> {want_out} in {base}, but the adapter's "
                f"factors are for {fan_in} -> {fan_out} (lora_A {parts['A']}, lora_B "
                f"{parts['B']}); it was made for another model"
            )
