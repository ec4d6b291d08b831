"""A hypernetwork that writes a LoRA adapter for a local model from a task's instruction.

The recipe of TAGI and Text-to-LoRA:

1. the instruction is embedded by a frozen encoder: the packaged all-MiniLM-L6-v2 sentence
   encoder by default (mean pooling, unit length, as sentence-transformers does), or the base
   model's own mean-pooled last hidden states (``encoder="base"``);
2. a shared MLP trunk reads that embedding together with a learned embedding of the layer and
   one of the module type (``q_proj``, ``v_proj``...), once per (layer, module type);
3. one output head per module type, sized from that module's in/out features (read from the base
   model, so grouped-query attention's narrow ``v_proj`` gets its own shape), writes
   ``lora_A [r, in]`` and ``lora_B [out, r]``.

A fresh hypernetwork writes a near-zero ``B`` (as LoRA starts from ``B = 0``), so its adapters
leave the base model all but unchanged until it is trained. The output is a standard peft
adapter: :meth:`Hypernetwork.generate` returns its state dict and :class:`peft.LoraConfig`, and
:func:`write_peft_folder` (or :meth:`Hypernetwork.write_adapter`) puts it on disk for
``PeftModel.from_pretrained``.

    hypernet = Hypernetwork.from_pretrained("path/to/hypernetwork")
    state_dict, config = hypernet.generate("Answer the question with yes or no.")
    write_peft_folder(state_dict, config, "adapters/yes-no")
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from capplug._cache import share_like_umask
from capplug._runtime import pick_device, quiet_transformers, seeded
from capplug.chat import blank
from capplug.errors import CheckpointError, ModelNotFoundError, TruncationWarning
from capplug.models import BUNDLED_DIR, DEFAULT_CHAT_MODEL, DEFAULT_HYPERNETWORK, resolve
from capplug.models.adapter_folder import (
    META_BASE_ARCHITECTURE,
    META_BASE_MODEL,
    architecture_signature,
    canonical_model_name,
    linear_shapes,
    peft_key,
    write_peft_folder,
)

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = [
    "DEFAULT_HYPERNETWORK",
    "Hypernetwork",
    "HypernetworkConfig",
    "write_peft_folder",
]

DEFAULT_BASE = DEFAULT_CHAT_MODEL
CONFIG_FILE = "hypernetwork.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "capplug-hypernetwork/1"
_LAYER = re.compile(r"\.(\d+)\.")
_BASE_ENCODER_MAX_TOKENS = 512


@dataclass
class HypernetworkConfig:
    """Everything that fixes a hypernetwork's shape and what its adapters are for."""

    base_model: str
    """The base model's name as adapters record it (``base_model_name_or_path``)."""
    base_ref: str
    """How to load the base model here (a packaged name, folder or Hugging Face id)."""
    base_architecture: str
    """The base model's :func:`architecture_signature`; adapters carry it as metadata."""
    module_shapes: dict[str, list[int]]
    """``{module type: [in_features, out_features]}``, e.g. ``{"v_proj": [576, 192]}``."""
    module_paths: dict[str, list[str]]
    """``{module type: [module path in layer 0, in layer 1, ...]}``."""
    encoder: str = "minilm"
    """The instruction encoder: a sentence-encoder reference, or ``"base"`` for the base model."""
    embedding_dim: int = 384
    max_instruction_tokens: int = 256
    """The most instruction tokens the encoder reads; longer instructions are cut, with a warning."""
    r: int = 8
    alpha: int = 16
    hidden_dim: int = 256
    layer_embedding_dim: int = 32
    module_embedding_dim: int = 32
    dropout: float = 0.1
    format: str = field(default=FORMAT)

    @property
    def module_types(self) -> list[str]:
        return list(self.module_paths)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.module_paths.values())))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class InstructionEncoder:
    """A frozen text encoder: mean-pooled last hidden states, scaled to unit length."""

    def __init__(self, ref: str, *, max_tokens: int, device: torch.device) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = resolve(ref)
        with quiet_transformers():
            self.model = AutoModel.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
            )
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = ref
        self.max_tokens = max_tokens
        self.device = device

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, warn: bool = True) -> torch.Tensor:
        """``[len(texts), embedding_dim]`` embeddings; over-long texts are cut to ``max_tokens``."""
        if warn:
            for text in texts:
                count = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
                if count > self.max_tokens:
                    warnings.warn(
                        f"the instruction is {count} tokens long; the {self.name} encoder reads "
                        f"at most {self.max_tokens}, so it was cut to its first "
                        f"{self.max_tokens} tokens and the rest does not shape the adapter",
                        TruncationWarning,
                        stacklevel=3,
                    )
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


class Hypernetwork(nn.Module):
    """Instruction text -> LoRA weights for every target module of every layer of a base model.

    Build a fresh one for a base model with :meth:`from_base`, load a trained one with
    :meth:`from_pretrained`, and make an adapter with :meth:`generate`.
    """

    def __init__(self, config: HypernetworkConfig) -> None:
        super().__init__()
        if config.format != FORMAT:
            raise CheckpointError(f"unknown hypernetwork format {config.format!r}; want {FORMAT}")
        self.config = config
        hidden = config.hidden_dim
        self.instruction_proj = nn.Sequential(
            nn.LayerNorm(config.embedding_dim), nn.Linear(config.embedding_dim, hidden)
        )
        self.layer_embedding = nn.Embedding(config.num_layers, config.layer_embedding_dim)
        self.module_embedding = nn.Embedding(len(config.module_types), config.module_embedding_dim)
        self.trunk = nn.Sequential(
            nn.Linear(hidden + config.layer_embedding_dim + config.module_embedding_dim, hidden),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.LayerNorm(hidden),
        )
        r = config.r
        self.heads_a = nn.ModuleDict()
        self.heads_b = nn.ModuleDict()
        for module_type in config.module_types:
            fan_in, fan_out = config.module_shapes[module_type]
            self.heads_a[_key(module_type)] = _Head(hidden, r * fan_in)
            self.heads_b[_key(module_type)] = _Head(hidden, fan_out * r)
        self._encoder: InstructionEncoder | None = None
        self.reset_heads()

    @torch.no_grad()
    def reset_heads(self) -> None:
        """LoRA's start: ``A`` random (kaiming-uniform scale, as peft), ``B`` all but zero."""
        for module_type in self.config.module_types:
            fan_in, _ = self.config.module_shapes[module_type]
            head_a, head_b = self.heads_a[_key(module_type)], self.heads_b[_key(module_type)]
            bound = 1.0 / math.sqrt(fan_in)
            # The bias is the instruction-independent part of A; the weight lets it vary.
            head_a.bias.uniform_(-bound, bound)
            head_a.weight.normal_(0.0, 0.5 * bound)
            head_b.bias.zero_()
            # Not exactly zero: gradients then reach the trunk and A from the first step.
            head_b.weight.normal_(0.0, 1e-6)

    # ----------------------------------------------------------------------- construction

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike[str] = DEFAULT_BASE,
        *,
        encoder: str = "minilm",
        r: int = 8,
        alpha: int = 16,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        hidden_dim: int = 256,
        layer_embedding_dim: int = 32,
        module_embedding_dim: int = 32,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> Hypernetwork:
        """A fresh (untrained) hypernetwork sized for ``base``; no base weights are loaded.

        Args:
            base: the model its adapters are for (default: the packaged SmolLM2-135M-Instruct).
            encoder: ``"minilm"`` (default), another sentence-encoder reference, or ``"base"``.
            target_modules: module names to write adapters for, in every layer.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        for name, value in (("r", r), ("alpha", alpha), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if isinstance(target_modules, str) or not target_modules:
            raise ValueError(
                f"target_modules must be a list of module names such as ['q_proj', 'v_proj']; "
                f"got {target_modules!r}"
            )
        ref = os.fspath(base)
        folder = resolve(ref)
        base_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        # The module shapes come from the architecture alone: build it without weights.
        with torch.device("meta"), quiet_transformers():
            skeleton = AutoModelForCausalLM.from_config(base_config, trust_remote_code=False)
        shapes, paths = _module_layout(linear_shapes(skeleton), list(target_modules), ref)
        if encoder == "base":
            embedding_dim = int(base_config.hidden_size)
            max_tokens = min(
                int(getattr(base_config, "max_position_embeddings", _BASE_ENCODER_MAX_TOKENS)),
                _BASE_ENCODER_MAX_TOKENS,
            )
        else:
            embedding_dim, max_tokens = _encoder_facts(encoder)
        config = HypernetworkConfig(
            base_model=canonical_model_name(ref),
            base_ref=ref if not Path(ref).expanduser().is_dir() else str(folder),
            base_architecture=architecture_signature(base_config),
            module_shapes=shapes,
            module_paths=paths,
            encoder=encoder,
            embedding_dim=embedding_dim,
            max_instruction_tokens=max_tokens,
            r=r,
            alpha=alpha,
            hidden_dim=hidden_dim,
            layer_embedding_dim=layer_embedding_dim,
            module_embedding_dim=module_embedding_dim,
            dropout=dropout,
        )
        with seeded(seed):
            return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike[str] = DEFAULT_HYPERNETWORK,
        *,
        device: str | torch.device | None = None,
    ) -> Hypernetwork:
        """Load a trained hypernetwork: a folder written by :meth:`save_pretrained`, or the bundled one.

        Raises:
            ModelNotFoundError: no such folder, or the bundled hypernetwork is not in this install.
            CheckpointError: the folder is not a capplug hypernetwork or its weights do not fit.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = hypernetwork_folder(ref)
        try:
            raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            config = HypernetworkConfig(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{folder / CONFIG_FILE} is not a hypernetwork config: {exc}"
            ) from exc
        model = cls(config)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{folder} holds no {WEIGHTS_FILE}")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weights} could not be read ({exc}): it is corrupt") from exc
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise CheckpointError(f"{weights} does not fit {folder / CONFIG_FILE}: {exc}") from exc
        return model.to(pick_device(device)).eval()

    def save_pretrained(
        self, folder: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
    ) -> Path:
        """Write ``hypernetwork.json`` and ``model.safetensors`` (``dtype=torch.bfloat16`` halves it)."""
        from safetensors.torch import save_file

        out = Path(folder).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()
        }
        _atomic(
            out / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"})
        )
        text = json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n"
        _atomic(out / CONFIG_FILE, lambda path: Path(path).write_text(text, encoding="utf-8"))
        return out

    # ----------------------------------------------------------------------------- forward

    @property
    def device(self) -> torch.device:
        return self.layer_embedding.weight.device

    def encoder(self) -> InstructionEncoder:
        """The frozen instruction encoder, loaded on first use."""
        if self._encoder is None:
            ref = self.config.base_ref if self.config.encoder == "base" else self.config.encoder
            self._encoder = InstructionEncoder(
                ref, max_tokens=self.config.max_instruction_tokens, device=self.device
            )
        return self._encoder

    def embed(self, instructions: Sequence[str], *, warn: bool = True) -> torch.Tensor:
        """Embed instructions with the frozen encoder; ``[len(instructions), embedding_dim]``."""
        if isinstance(instructions, str) or not isinstance(instructions, Sequence):
            raise TypeError("instructions must be a list of strings")
        for i, text in enumerate(instructions):
            _check_instruction(text, f"instructions[{i}]")
        return self.encoder().encode(list(instructions), warn=warn).to(self.device)

    def forward(self, embeddings: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """LoRA factors for a batch of instruction embeddings ``[T, embedding_dim]``.

        Returns ``{module type: (A [T, layers, r, in], B [T, layers, out, r])}``.
        """
        config = self.config
        count, layers = embeddings.shape[0], config.num_layers
        task = self.instruction_proj(embeddings.to(self.device, torch.float32))
        task = task[:, None, :].expand(count, layers, -1)
        layer = self.layer_embedding.weight[None].expand(count, -1, -1)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, module_type in enumerate(config.module_types):
            kind = self.module_embedding.weight[k].expand(count, layers, -1)
            hidden = self.trunk(torch.cat([task, layer, kind], dim=-1))
            fan_in, fan_out = config.module_shapes[module_type]
            a = self.heads_a[_key(module_type)](hidden).view(count, layers, config.r, fan_in)
            b = self.heads_b[_key(module_type)](hidden).view(count, layers, fan_out, config.r)
            out[module_type] = (a, b)
        return out

    # -------------------------------------------------------------------------- adapters

    def lora_config(self) -> LoraConfig:
        """The peft config every adapter of this hypernetwork has."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=0.0,
            target_modules=sorted(self.config.module_types),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.config.base_model,
            inference_mode=True,
        )

    @torch.no_grad()
    def generate(self, instruction: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
        """Write the adapter for one instruction: its peft state dict and :class:`LoraConfig`.

        Raises:
            ValueError: an empty instruction. A longer one than the encoder reads is cut to its
                limit with a :class:`~capplug.TruncationWarning` that says so.
        """
        _check_instruction(instruction, "instruction")
        was_training = self.training
        self.eval()
        try:
            factors = self(self.embed([instruction]))
        finally:
            self.train(was_training)
        return self.state_dict_of(factors, 0), self.lora_config()

    def state_dict_of(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], index: int
    ) -> dict[str, torch.Tensor]:
        """The peft state dict of the ``index``-th adapter of a :meth:`forward` result."""
        state: dict[str, torch.Tensor] = {}
        for module_type, (a, b) in factors.items():
            for layer, path in enumerate(self.config.module_paths[module_type]):
                state[peft_key(path, "A")] = a[index, layer].detach().to("cpu").contiguous()
                state[peft_key(path, "B")] = b[index, layer].detach().to("cpu").contiguous()
        return state

    def adapter_metadata(self, instruction: str | None = None) -> dict[str, str]:
        """The safetensors metadata capplug records with a generated adapter."""
        meta = {
            META_BASE_MODEL: self.config.base_model,
            META_BASE_ARCHITECTURE: self.config.base_architecture,
            "capplug_source": "capplug.adapters.hypernetwork",
        }
        if instruction is not None:
            meta["capplug_instruction"] = instruction[:4096]
        return meta

    def write_adapter(self, instruction: str, out: str | os.PathLike[str]) -> Path:
        """Generate the adapter for ``instruction`` and write it as a peft folder at ``out``."""
        state, config = self.generate(instruction)
        return write_peft_folder(state, config, out, metadata=self.adapter_metadata(instruction))


# --------------------------------------------------------------------------------- helpers


class _Head(nn.Linear):
    """A linear output head whose weight term is scaled by ``1 / sqrt(in_features)``.

    The trunk ends in a LayerNorm, so its features have unit scale and a plain linear head's
    outputs move by about ``lr * sqrt(hidden)`` per Adam step: far more than a LoRA factor's
    entries (hundredths) can take. The fixed scale keeps each step a small fraction of them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.in_features)
        return torch.nn.functional.linear(x, self.weight) * scale + self.bias


def _key(module_type: str) -> str:
    return module_type.replace(".", "_")


def _check_instruction(text: Any, argument: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{argument} must be a string; got {type(text).__name__}")
    if blank(text):
        raise ValueError(
            f"{argument} is empty; give the task's instruction, e.g. 'Answer the question with "
            f"yes or no.'"
        )


def _module_layout(
    shapes: dict[str, tuple[int, int]], targets: list[str], base: str
) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Per target type: its (in, out) shape and its module path in each layer, in layer order."""
    module_shapes: dict[str, list[int]] = {}
    module_paths: dict[str, list[str]] = {}
    for target in targets:
        found = sorted(
            (int(m.group(1)), path)
            for path in shapes
            if (path == target or path.endswith("." + target)) and (m := _LAYER.search(path))
        )
        if not found:
            known = sorted({p.rsplit(".", 1)[-1] for p in shapes})
            raise ValueError(
                f"{base} has no linear layer called {target!r} inside its layers; its linear "
                f"layers are {known}"
            )
        layers = [index for index, _ in found]
        if layers != list(range(len(layers))):
            raise ValueError(
                f"{base}: {target!r} is not in every layer exactly once (found it in layers "
                f"{layers[:8]}...); name a module every layer has"
            )
        distinct = {shapes[path] for _, path in found}
        if len(distinct) != 1:
            raise ValueError(
                f"{base}: {target!r} has different shapes across layers ({sorted(distinct)}); one "
                f"output head cannot write them all"
            )
        module_shapes[target] = list(distinct.pop())
        module_paths[target] = [path for _, path in found]
    counts = {len(p) for p in module_paths.values()}
    if len(counts) != 1:
        raise ValueError(f"{base}: the target modules appear in different numbers of layers")
    return module_shapes, module_paths


def _encoder_facts(ref: str) -> tuple[int, int]:
    """(embedding width, token limit) of a sentence encoder, without loading its weights."""
    folder = resolve(ref)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"encoder {ref!r} has no readable config.json ({exc})") from exc
    width = int(config["hidden_size"])
    limit = int(config.get("max_position_embeddings", 512))
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        # sentence-transformers' own limit: what the encoder was trained to read.
        limit = min(limit, int(json.loads(st_config.read_text())["max_seq_length"]))
    return width, limit


def hypernetwork_folder(ref: str | os.PathLike[str]) -> Path:
    """The folder a hypernetwork reference names: the bundled one by name, else a folder."""
    text = os.fspath(ref).strip()
    if text.lower() == DEFAULT_HYPERNETWORK:
        folder = BUNDLED_DIR / DEFAULT_HYPERNETWORK
        if not (folder / CONFIG_FILE).is_file():
            raise ModelNotFoundError(
                f"the default hypernetwork {DEFAULT_HYPERNETWORK!r} is not bundled with this "
                f"install of capplug yet; train one with `capplug adapters train-hypernet "
                f"--out DIR` and pass that folder (--hypernet DIR)"
            )
        return folder
    folder = resolve(text)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"{text} holds no {CONFIG_FILE}: not a hypernetwork folder written by "
            f"Hypernetwork.save_pretrained or `capplug adapters train-hypernet`"
        )
    return folder


def _atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        share_like_umask(tmp)  # mkstemp's 0600 would keep other users out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
