"""The Scorer: a cross-encoder that says how well a response answers an instruction, in [0, 1]."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch

from capplug._cache import staging_dir
from capplug._runtime import (
    forward_parameters,
    pick_device,
    pick_dtype,
    quiet_transformers,
    seeded,
    tune_cpu_threads,
)
from capplug.chat import Instruction, check_responses, flatten_chat
from capplug.errors import CheckpointError, TruncationWarning
from capplug.models import DEFAULT_SCORER, resolve
from capplug.scoring._checkpoint import (
    SCORE_MAPPING_KEY,
    ScoreMapping,
    clamp_length,
    load_checkpoint,
    model_name,
)
from capplug.scoring.precision import Precision, prepare
from capplug.scoring.precision import choose as choose_cpu_precision

if TYPE_CHECKING:
    from capplug.models.adapter_folder import AdapterFiles, BaseModelIdentity

__all__ = [
    "DEFAULT_SCORER",
    "SCORE_MAPPING_KEY",
    "EncodedPair",
    "Ranked",
    "ScoreMapping",
    "Scorer",
    "TruncationWarning",
    "load_scorer",
]

logger = logging.getLogger(__name__)

_warned_truncation = False
# More characters than any token spans in practice (English averages 4 to 5 per token).
_MAX_CHARS_PER_TOKEN = 16
# A batch whose longest pair has more tokens than this keeps much shorter pairs out of it.
_SPLIT_BATCHES_PAST = 128
# On a GPU, pairs are tokenised this many at a time while the GPU runs the previous ones.
_GPU_CHUNK_PAIRS = 1024


class Ranked(NamedTuple):
    """One response with its score and its position in the list that was scored."""

    index: int
    score: float
    response: str


class EncodedPair(NamedTuple):
    """One (instruction, response) pair as the scorer's tokens, cut to its ``max_length``."""

    ids: list[int]
    type_ids: list[int]


class Scorer:
    """A cross-encoder that scores (instruction, response) pairs in [0, 1]; higher is better.

    ``Scorer()`` loads the bundled default scorer. Build others with :meth:`from_pretrained`
    (a trained checkpoint) or :meth:`from_backbone` (a fresh head on a bare encoder, for
    training), or pass an already loaded ``model`` and ``tokenizer`` with their ``score_mapping``.

    Long pairs are cut to ``max_length`` tokens: the response keeps its first
    ``max_response_tokens`` tokens (default: half of ``max_length``), and the instruction keeps
    its end, which in a chat is the latest turn. The first cut in a process warns once.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        *,
        score_mapping: ScoreMapping | None = None,
        max_length: int = 512,
        max_response_tokens: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 256,
        name: str | None = None,
    ) -> None:
        if model is None:
            if tokenizer is not None:
                raise TypeError("give both model and tokenizer, or neither for the default scorer")
            model, tokenizer, recorded = load_checkpoint(DEFAULT_SCORER, score_mapping)
            score_mapping = score_mapping or recorded
            name = DEFAULT_SCORER
        elif tokenizer is None or score_mapping is None:
            raise TypeError(
                "a model needs its tokenizer and a score_mapping ('sigmoid' or 'clip'); "
                "or load a checkpoint with Scorer.from_pretrained(ref)"
            )
        if score_mapping not in ("sigmoid", "clip"):
            raise ValueError(f"score_mapping must be 'sigmoid' or 'clip'; got {score_mapping!r}")
        if int(getattr(model.config, "num_labels", 1)) != 1:
            raise CheckpointError(
                f"a scorer needs a single-logit head; this model has {model.config.num_labels} labels"
            )
        self.name: str = model_name(name, model)
        """The scorer's name in adapter files: a packaged name, a Hugging Face id or a folder."""
        self.device = pick_device(device)
        calibrate = self.device.type == "cpu" and (dtype is None or dtype == "auto")
        self.dtype = pick_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.score_mapping: ScoreMapping = score_mapping
        self.model.config.update({SCORE_MAPPING_KEY: score_mapping})
        self.max_length = clamp_length(max_length, model.config, tokenizer)
        if max_response_tokens is not None and max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1; got {max_response_tokens}")
        self.max_response_tokens = max_response_tokens or self.max_length // 2
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        # Measured on CPU: 4k-token batches beat larger ones (benchmarks/scoring_speed.py).
        self.max_batch_tokens = max_batch_tokens or (32768 if self.device.type == "cuda" else 4096)
        self.max_batch_size = max_batch_size
        self.chunk_pairs: int | None = None if self.device.type == "cpu" else _GPU_CHUNK_PAIRS
        """Pairs tokenised at a time while the device runs the previous ones (``None``: all at
        once, as on a CPU, where tokenising and the forward pass share the cores)."""
        self._encoder = _pair_encoder(tokenizer)
        self._n_special = self._encoder.num_special_tokens_to_add(True)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        forward_args = set(forward_parameters(self.model))
        self._uses_type_ids = (
            "token_type_ids" in forward_args
            and (getattr(model.config, "type_vocab_size", 2) or 0) > 1
        )
        self.precision = Precision(
            str(self.dtype).removeprefix("torch."),
            "given" if dtype not in (None, "auto") else f"the {self.device.type} default",
        )
        """The precision the scorer runs at and why (on a CPU, chosen per machine by default)."""
        if self.device.type == "cpu":
            tune_cpu_threads()
            if calibrate:
                self.precision = choose_cpu_precision(self)
                self.dtype = self.precision.torch_dtype
        self.model = prepare(self.model, self.device, self.dtype)

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        max_length: int = 512,
        dtype: torch.dtype | str | None = None,
        score_mapping: ScoreMapping | None = None,
        max_response_tokens: int | None = None,
    ) -> Scorer:
        """Load a single-logit sequence-classification checkpoint as a scorer.

        Args:
            ref: a local folder, a Hugging Face id (e.g. ``btan2/cappy-large``), or a packaged name.
            device: ``"cpu"``, ``"cuda"``, ...; default: the GPU if there is one.
            max_length: the most tokens one (instruction, response) pair may take.
            dtype: default bfloat16 (or float16) on GPU; on CPU, bfloat16 where the processor
                has it natively and a one-time calibration finds it faster with the same
                ranking, else float32 (``scorer.precision`` says which and why).
            score_mapping: overrides the mapping recorded in the checkpoint's config; needed only
                for checkpoints that record none.

        A task scorer (a LoRA folder that ``capplug adapt --lora-rank`` writes) loads the scorer
        it adapts, named in its ``adapter_config.json``, and merges it in (:meth:`with_lora`).

        Raises:
            CheckpointError: the checkpoint has no single-logit head, no safetensors weights, or
                records no score mapping and none was given.
            AdapterFileError: a task scorer's files are missing, truncated or corrupt.
        """
        from capplug.scoring.lora import is_lora_folder

        folder = Path(os.fspath(ref)).expanduser()
        if is_lora_folder(folder):
            from capplug.models.adapter_folder import read_adapter

            base = read_adapter(folder).config.base_model_name_or_path
            return cls.from_pretrained(
                base,
                device=device,
                max_length=max_length,
                dtype=dtype,
                score_mapping=score_mapping,
                max_response_tokens=max_response_tokens,
            ).with_lora(folder)
        model, tokenizer, mapping = load_checkpoint(ref, score_mapping)
        return cls(
            model,
            tokenizer,
            score_mapping=mapping,
            max_length=max_length,
            max_response_tokens=max_response_tokens,
            device=device,
            dtype=dtype,
            name=str(ref),
        )

    @classmethod
    def from_backbone(
        cls,
        ref: str | os.PathLike[str] = "minilm",
        *,
        device: str | torch.device | None = None,
        max_length: int = 512,
        seed: int | None = 0,
        max_response_tokens: int | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> Scorer:
        """A bare encoder with a fresh one-logit head (scored through a sigmoid), for training."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = resolve(ref)
        with quiet_transformers(), seeded(seed):
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=1, use_safetensors=True, trust_remote_code=False
            )
        model.config.problem_type = "regression"
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        return cls(
            model,
            tokenizer,
            score_mapping="sigmoid",
            max_length=max_length,
            max_response_tokens=max_response_tokens,
            device=device,
            dtype=dtype,
        )

    @property
    def identity(self) -> BaseModelIdentity:
        """What a task scorer made from this scorer must match (name and architecture)."""
        from capplug.models.adapter_folder import model_identity

        return model_identity(self.name, self.model.config)

    def with_lora(self, adapter: str | os.PathLike[str] | AdapterFiles) -> Scorer:
        """A second scorer: this one with a task scorer's LoRA merged in.

        The adapter (a folder, or :class:`~capplug.models.adapter_folder.AdapterFiles` already
        read) is checked completely first: made for this scorer, whole files, shapes that fit.
        The new scorer shares every tensor the adapter leaves alone with this one, at this
        one's device and precision, so it costs the adapted layers' memory and tens of ms.

        Raises:
            WrongBaseModelError: the adapter was made for another scorer.
            AdapterFileError: missing, truncated or corrupt files, or shapes that do not fit.
        """
        from capplug.models.adapter_folder import AdapterFiles, linear_shapes, read_adapter
        from capplug.scoring.lora import merged_weights

        files = adapter
        if not isinstance(files, AdapterFiles):
            files = read_adapter(adapter, identity=self.identity, shapes=linear_shapes(self.model))
        return self.with_weights(merged_weights(self, files), name=self.name)

    def with_weights(
        self, weights: Mapping[str, torch.Tensor], *, name: str | None = None
    ) -> Scorer:
        """A second scorer whose weights are this one's with ``weights`` (by state-dict key)
        replaced; every other tensor is shared, not copied."""
        state = self.model.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise KeyError(f"the scorer has no weight {unknown[0]!r}")
        with torch.device("meta"):
            model = type(self.model)(self.model.config)
        model.load_state_dict({**state, **weights}, assign=True, strict=True)
        buffers = dict(self.model.named_buffers())
        for key, _ in list(model.named_buffers()):
            owner, _, attr = key.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffers[key]
        scorer = type(self)(
            model,
            self.tokenizer,
            score_mapping=self.score_mapping,
            max_length=self.max_length,
            max_response_tokens=self.max_response_tokens,
            device=self.device,
            dtype=self.dtype,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_size=self.max_batch_size,
            name=name or self.name,
        )
        scorer.precision = self.precision  # the same path, chosen for this one
        return scorer

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write the checkpoint (safetensors, tokenizer, score mapping) atomically to ``folder``."""
        final = Path(folder).expanduser().resolve()
        with staging_dir(final) as tmp, quiet_transformers():
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        return final

    # ----------------------------------------------------------------------------- scoring

    def score(self, instruction: Instruction, responses: Sequence[str]) -> list[float]:
        """Score each response to one instruction; scores are in [0, 1] and in input order."""
        text = flatten_chat(instruction)
        responses = check_responses(responses)
        return self._score([text] * len(responses), responses).tolist()

    def score_pairs(self, pairs: Sequence[tuple[Instruction, str]]) -> list[float]:
        """Score (instruction, response) pairs; scores are in [0, 1] and in input order."""
        if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence):
            raise TypeError(
                f"pairs must be a list of (instruction, response) tuples; got {type(pairs).__name__}"
            )
        if len(pairs) == 0:
            raise ValueError(
                "pairs must be a non-empty list of (instruction, response) tuples; got 0"
            )
        instructions, responses = [], []
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(
                    f"pairs[{i}] must be an (instruction, response) tuple; got {pair!r:.80}"
                )
            instructions.append(flatten_chat(pair[0], argument=f"pairs[{i}][0]"))
            if not isinstance(pair[1], str):
                raise TypeError(
                    f"pairs[{i}][1] (the response) must be a string; got {type(pair[1]).__name__}"
                )
            responses.append(pair[1])
        return self._score(instructions, responses).tolist()

    def rank(
        self, instruction: Instruction, responses: Sequence[str], *, top_k: int | None = None
    ) -> list[Ranked]:
        """Responses best first, each with its index in ``responses`` and its score."""
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None; got {top_k!r}")
        responses = check_responses(responses)
        scores = self.score(instruction, responses)
        # Stable sort: equal scores keep their input order.
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
        return [Ranked(i, scores[i], responses[i]) for i in order]

    def select(self, instruction: Instruction, responses: Sequence[str]) -> Ranked:
        """The best response with its score and index."""
        return self.rank(instruction, responses, top_k=1)[0]

    # ----------------------------------------------------------------------------- internals

    def _score(self, instructions: list[str], responses: list[str]) -> np.ndarray:
        out = np.empty(len(instructions), dtype=np.float32)
        chunk = self.chunk_pairs or max(len(instructions), 1)
        pending = []
        with torch.inference_mode():
            for start in range(0, len(instructions), chunk):
                pairs = self.encode(
                    instructions[start : start + chunk], responses[start : start + chunk]
                )
                for batch in self.batches(pairs):
                    # Left on the device: a GPU runs the queued batches while the next chunk is
                    # tokenised, and is waited for once, below.
                    scores = self._map(self.logits([pairs[i] for i in batch]))
                    pending.append((start + batch, scores))
            for index, scores in pending:
                out[index] = scores.cpu().numpy()
        return out

    def encode(
        self, instructions: list[str], responses: list[str], *, max_length: int | None = None
    ) -> list[EncodedPair]:
        """Token ids of each pair, cut to ``max_length`` (default: the scorer's own).

        With :meth:`batches`, :meth:`collate` and :meth:`logits` this is the path
        :meth:`score` takes, public for training, which encodes once and batches its own way."""
        max_response_tokens = self.max_response_tokens
        if max_length is not None and max_length < self.max_length:
            max_response_tokens = min(max_response_tokens, max_length // 2)
        max_length = min(max_length or self.max_length, self.max_length)
        # Cut in characters before tokenising: only the instruction's end and the response's
        # start can fit, and tokenising all of a 15 MB conversation to keep 256 tokens of it
        # would hold the scorer for seconds.
        chars = max_length * _MAX_CHARS_PER_TOKEN
        instructions = [text[-chars:] for text in instructions]
        responses = [text[:chars] for text in responses]
        unique = list(dict.fromkeys(instructions))
        encoded_instructions = dict(
            zip(unique, self._encoder.encode_batch(unique, add_special_tokens=False), strict=True)
        )
        encoded_responses = self._encoder.encode_batch(responses, add_special_tokens=False)
        budget = max_length - self._n_special
        pairs = []
        cut = False
        for text, response in zip(instructions, encoded_responses, strict=True):
            instruction = encoded_instructions[text]
            r_ids, i_ids = response.ids, instruction.ids
            if len(r_ids) + len(i_ids) > budget:
                cut = True
                keep_r = min(len(r_ids), max_response_tokens, budget)
                keep_i = budget - keep_r
                # Spend what the instruction does not need on more of the response.
                if len(i_ids) < keep_i:
                    keep_r = min(len(r_ids), budget - len(i_ids))
                    keep_i = budget - keep_r
                response = _truncated(response, keep_r, "right")
                instruction = _truncated(instruction, keep_i, "left")
            merged = self._encoder.post_process(instruction, response, add_special_tokens=True)
            pairs.append(EncodedPair(merged.ids, merged.type_ids))
        if cut:
            _warn_truncation(max_length, max_response_tokens)
        return pairs

    def batches(self, pairs: list[EncodedPair]) -> Iterator[np.ndarray]:
        """Indices of ``pairs`` in batches of similar length, within the scorer's batch limits."""
        lengths = np.fromiter((len(p.ids) for p in pairs), dtype=np.int64, count=len(pairs))
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            longest = int(lengths[order[start]])
            size = max(1, min(self.max_batch_size, self.max_batch_tokens // max(longest, 1)))
            end = start + size
            # Padded to a long batch's longest, a short pair costs as much as a long one:
            # pairs under half the longest wait for a batch of their own. (Among short pairs,
            # padding costs less than another forward pass.)
            short = np.flatnonzero(lengths[order[start:end]] * 2 < longest)
            if short.size and longest > _SPLIT_BATCHES_PAST:
                end = start + int(short[0])
            yield order[start:end]
            start = end

    def logits(self, pairs: list[EncodedPair]) -> torch.Tensor:
        """The model's raw logit per pair (before the score mapping), as float32."""
        return self.model(**self.collate(pairs)).logits[:, 0].float()

    def collate(self, pairs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """Pad encoded pairs to the longest one into model inputs on the scorer's device."""
        width = max(len(p.ids) for p in pairs)
        ids = np.full((len(pairs), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(pairs), width), dtype=np.int64)
        types = np.zeros((len(pairs), width), dtype=np.int64)
        for row, pair in enumerate(pairs):
            n = len(pair.ids)
            ids[row, :n] = pair.ids
            mask[row, :n] = 1
            types[row, :n] = pair.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask}
        if self._uses_type_ids:
            arrays["token_type_ids"] = types
        if self.device.type != "cuda":
            return {name: torch.from_numpy(a).to(self.device) for name, a in arrays.items()}
        # From pinned memory the copy is queued behind the running batches instead of waiting.
        return {
            name: torch.from_numpy(a).pin_memory().to(self.device, non_blocking=True)
            for name, a in arrays.items()
        }

    def _map(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score_mapping == "sigmoid":
            return torch.sigmoid(logits)
        return logits.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        return (
            f"Scorer({name!r}, score_mapping={self.score_mapping!r}, max_length={self.max_length}, "
            f"device={str(self.device)!r}, dtype={self.precision.dtype!r})"
        )


_PAIR_ENCODERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _pair_encoder(tokenizer: Any) -> Any:
    """The scorer's own copy of the tokenizer's Rust encoder, made once per tokenizer (scorers
    that share a tokenizer, as a task scorer shares its base's, share it: it is only read)."""
    try:
        return _PAIR_ENCODERS[tokenizer]
    except (KeyError, TypeError):
        pass
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(
            f"{type(tokenizer).__name__} has no fast (Rust) tokenizer; the scorer needs one "
            f"(save the checkpoint with a tokenizer.json)"
        )
    # A private copy: the tokenizer's own truncation and padding settings must not apply.
    encoder = Tokenizer.from_str(backend.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    with contextlib.suppress(TypeError):  # not every tokenizer takes a weak reference
        _PAIR_ENCODERS[tokenizer] = encoder
    return encoder


def _truncated(encoding: Any, keep: int, side: Literal["left", "right"]) -> Any:
    if keep >= len(encoding.ids):
        return encoding
    from tokenizers import Encoding

    # A clone: one instruction's encoding is shared by every response scored against it.
    clone = Encoding.merge([encoding], growing_offsets=False)
    clone.truncate(max(keep, 0), direction=side)
    return clone


def _warn_truncation(max_length: int, max_response_tokens: int) -> None:
    global _warned_truncation
    if _warned_truncation:
        return
    _warned_truncation = True
    warnings.warn(
        f"capplug: some (instruction, response) pairs exceed max_length={max_length} tokens and "
        f"were cut: responses keep their first {max_response_tokens} tokens, instructions their "
        f"end (this warning shows once per process)",
        TruncationWarning,
        stacklevel=5,
    )


def load_scorer(scorer: Any = None) -> Any:
    """The scorer a caller means: ``None`` for the bundled default, a reference (a folder, a
    packaged name, a Hugging Face id) to load, or anything with ``.score(instruction,
    responses)``, used as it is. Anything else is a ``TypeError`` that says what is accepted."""
    if scorer is None:
        return Scorer()
    if isinstance(scorer, str | os.PathLike):
        return Scorer.from_pretrained(scorer)
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(
            "scorer must be a capplug Scorer (or have .score(instruction, responses)), a scorer "
            f"reference such as a folder or 'capplug-default', or None; got {type(scorer).__name__}"
        )
    return scorer
