"""One local model serving many LoRA adapters: attach by name, pick per request, evict the stalest.

:class:`AdapterRuntime` wraps a :class:`~capplug.llms.LocalChatModel` (its chat template,
padding and decoding) and attaches peft LoRA adapters to it by name. At most ``max_loaded``
adapters stay in the model; adding one more evicts the least recently used (peft
``delete_adapter``). Every prompt of a :meth:`~AdapterRuntime.generate` call may name its own
adapter, or ``None`` for the bare base model: a batch whose prompts share an adapter runs with it
active, and a batch that mixes adapters runs once with peft's ``adapter_names`` (``"__base__"``
for the bare model on that row).

Every adapter is checked before anything reaches the model (:func:`read_adapter`): made for
this base model (:class:`BaseModelIdentity`), complete and uncorrupted files, and tensor shapes
that fit the layers they adapt.

    runtime = AdapterRuntime.from_pretrained()  # the packaged SmolLM2-135M-Instruct
    runtime.add("summaries", "adapters/summaries")
    runtime.generate(["Summarize: ...", "What is 2 + 2?"], adapter=["summaries", None])
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from capplug._runtime import check_positive_int
from capplug.chat import Instruction
from capplug.llms.local import DEFAULT_MODEL, LocalChatModel
from capplug.models.adapter_folder import (
    AdapterFileError,
    BaseModelIdentity,
    linear_shapes,
    model_identity,
    read_adapter,
)

__all__ = ["BASE", "AdapterRuntime"]

BASE = "__base__"
"""peft's name for "no adapter" on one row of a mixed-adapter batch."""

AdapterChoice = str | None | Sequence[str | None]


class AdapterRuntime:
    """A local causal LM with named LoRA adapters attached, at most ``max_loaded`` at a time.

    Build one with :meth:`from_pretrained`, or around a :class:`LocalChatModel` you already have
    (its model gains adapter layers in place: generate through the runtime from then on).
    """

    def __init__(
        self,
        chat: LocalChatModel,
        *,
        identity: BaseModelIdentity | None = None,
        max_loaded: int = 8,
    ) -> None:
        check_positive_int(max_loaded, "max_loaded")
        self.chat = chat
        self.identity = identity or model_identity(chat.name, chat.model.config)
        self.max_loaded = max_loaded
        self._base = chat.model
        self._shapes = linear_shapes(chat.model)
        self._peft: Any = None
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name -> where it came from

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        max_loaded: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> AdapterRuntime:
        """Load a causal LM by reference (default: the packaged SmolLM2-135M-Instruct)."""
        chat = LocalChatModel.from_pretrained(ref, device=device, dtype=dtype)
        return cls(chat, identity=model_identity(ref, chat.model.config), max_loaded=max_loaded)

    def __repr__(self) -> str:
        return (
            f"AdapterRuntime({self.identity.name!r}, loaded={list(self._loaded)}, "
            f"max_loaded={self.max_loaded})"
        )

    # --------------------------------------------------------------------------- adapters

    @property
    def loaded(self) -> list[str]:
        """Names of the attached adapters, least recently used first."""
        return list(self._loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    def add(self, name: str, folder: str | os.PathLike[str]) -> None:
        """Attach the peft LoRA adapter in ``folder`` as ``name``, evicting the stalest if full.

        The folder is checked completely first; a refused adapter leaves the model untouched.
        Adding a name already attached replaces that adapter.

        Raises:
            WrongBaseModelError: the adapter was made for another base model.
            AdapterFileError: missing, truncated or corrupt files, or shapes that do not fit.
        """
        self._check_name(name)
        files = read_adapter(folder, identity=self.identity, shapes=self._shapes)
        self._attach(name, files.state_dict, files.config, source=str(files.folder))

    def add_weights(self, name: str, state_dict: Mapping[str, torch.Tensor], config: Any) -> None:
        """Attach an adapter held in memory (as :meth:`Hypernetwork.generate` returns it).

        The same checks as :meth:`add` apply: the config's base model, and every shape.
        """
        import tempfile

        from capplug.models.adapter_folder import write_peft_folder

        self._check_name(name)
        # One check path for files and tensors: write the adapter as its folder would be.
        with tempfile.TemporaryDirectory(prefix="capplug-adapter-") as tmp:
            write_peft_folder(state_dict, config, tmp)
            files = read_adapter(tmp, identity=self.identity, shapes=self._shapes)
        self._attach(name, files.state_dict, files.config, source="<memory>")

    def remove(self, name: str) -> None:
        """Detach one adapter (peft ``delete_adapter``)."""
        if name not in self._loaded:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.loaded}")
        with quiet_peft():
            self._peft.delete_adapter(name)
        del self._loaded[name]
        if not self._loaded:
            # peft needs an adapter to be active for anything; with none left, take the layers out.
            self.chat.model = self._peft.unload().eval()
            self._base = self.chat.model
            self._peft = None

    def _attach(
        self, name: str, state_dict: Mapping[str, torch.Tensor], config: Any, *, source: str
    ) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        config = _inference_config(config)
        if name in self._loaded:
            self.remove(name)
        with quiet_peft():
            if self._peft is None:
                self._peft = get_peft_model(self._base, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
        try:
            result = set_peft_model_state_dict(self._peft, dict(state_dict), adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if missing:
                raise AdapterFileError(
                    f"adapter {source} lacks weights the model expects for it, e.g. {missing[0]}"
                )
        except Exception:
            self._loaded[name] = source
            self.remove(name)
            raise
        self._peft.eval()
        self._loaded[name] = source
        while len(self._loaded) > self.max_loaded:
            stalest = next(iter(self._loaded))
            self.remove(stalest)

    @staticmethod
    def _check_name(name: Any) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"adapter name must be a non-empty string; got {name!r}")
        if name == BASE or "." in name or name != name.strip() or name in "lora_":
            raise ValueError(
                f"adapter name {name!r} is not allowed: {BASE!r} means the bare model, and peft "
                f"names cannot hold dots or surrounding spaces, nor be part of 'lora_'"
            )

    # --------------------------------------------------------------------------- answers

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Instruction],
        *,
        adapter: AdapterChoice = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        seed: int | None = None,
        batch_size: int = 16,
        progress: bool = False,
        **generation_kwargs: Any,
    ) -> list[str]:
        """One answer per prompt, greedy by default, each with its own adapter.

        Args:
            prompts: instructions (strings or chats).
            adapter: one adapter name for every prompt, ``None`` for the bare base model, or a
                list with one name (or ``None``) per prompt.
            max_new_tokens: the most tokens an answer may have.
            do_sample: sample instead of greedy decoding (the checkpoint's generation config
                supplies temperature and top-p unless given here).
            seed: makes sampling repeatable for the same prompts in the same batches.
            batch_size: prompts per generation call.
            progress: show a progress bar over batches.

        Raises:
            KeyError: an adapter name that is not loaded.
        """
        if "adapter_names" in generation_kwargs:
            raise TypeError("generate() sets adapter_names itself")
        # A prompts argument that is not a list is refused by the model's own check below.
        listed = isinstance(prompts, Sequence) and not isinstance(prompts, str)
        names = self._per_prompt(adapter, len(prompts)) if listed else []
        for name in dict.fromkeys(n for n in names if n is not None):
            self._loaded.move_to_end(name)
        return self.chat.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            # Prompts sharing an adapter batch together, so most batches need no per-row routing.
            batch_key=lambda i: names[i] or "",
            route=lambda batch: self._routing([names[i] for i in batch]),
            **generation_kwargs,
        )

    @contextlib.contextmanager
    def _routing(self, names: list[str | None]):
        """The model to call and the extra arguments that route each row to its adapter."""
        unique = set(names)
        if self._peft is None:
            yield self._base, {}
        elif unique == {None}:
            with self._peft.disable_adapter():
                yield self._peft, {}
        elif len(unique) == 1:
            self._peft.set_adapter(names[0], inference_mode=True)
            yield self._peft, {}
        else:
            yield self._peft, {"adapter_names": [n if n is not None else BASE for n in names]}

    def _per_prompt(self, adapter: AdapterChoice, count: int) -> list[str | None]:
        if adapter is None or isinstance(adapter, str):
            names: list[str | None] = [adapter] * count
        elif isinstance(adapter, Sequence):
            names = list(adapter)
            if len(names) != count:
                raise ValueError(
                    f"adapter must name one adapter (or None) per prompt; got {len(names)} "
                    f"names for {count} prompts"
                )
        else:
            raise TypeError(
                f"adapter must be a name, None, or a list of them; got {type(adapter).__name__}"
            )
        for i, name in enumerate(names):
            if name is None or name == BASE:
                names[i] = None
            elif not isinstance(name, str):
                raise TypeError(f"adapter[{i}] must be a string or None; got {type(name).__name__}")
            elif name not in self._loaded:
                raise KeyError(
                    f"no adapter named {name!r} is loaded (loaded: {self.loaded}); add it with "
                    f"runtime.add({name!r}, folder)"
                )
        return names


@contextlib.contextmanager
def quiet_peft():
    """Hide peft's notices about what the runtime does on purpose (renames, active switches)."""
    with warnings.catch_warnings():
        for message in (
            r"The PEFT config's `base_model_name_or_path` was renamed",
            r"Adapter .* was active which is now deleted",
            r"`is_gradient_checkpointing` is deprecated",
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


def _inference_config(config: Any) -> Any:
    import copy

    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig; got {type(config).__name__}")
    config = copy.deepcopy(config)
    config.inference_mode = True
    config.task_type = "CAUSAL_LM"
    return config
