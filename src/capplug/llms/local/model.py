"""The local chat model itself: loading, prompts, log-likelihoods and plain answers
(:class:`LocalChatModel`; its candidate sampling is in ``_candidates``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from capplug._runtime import (
    check_positive_int,
    forward_parameters,
    pick_device,
    pick_dtype,
    quiet_transformers,
    seeded,
    tune_cpu_threads,
)
from capplug.chat import Instruction, chat_turns, flatten_chat
from capplug.errors import CheckpointError
from capplug.llms.local._candidates import CandidateSampling
from capplug.llms.local._decoding import eos_ids, progress_bar
from capplug.models import DEFAULT_CHAT_MODEL, resolve

__all__ = ["DEFAULT_MODEL", "LocalChatModel"]

logger = logging.getLogger("capplug.llms.local")

DEFAULT_MODEL = DEFAULT_CHAT_MODEL


class LocalChatModel(CandidateSampling):
    """A local causal LM with its tokenizer and chat template, for candidates and likelihoods.

    Build one with :meth:`from_pretrained`. Prompts are plain strings (one user turn) or chats
    (lists of ``{"role", "content"}`` dicts or LangChain-style message objects).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        name: str | None = None,
    ) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise CheckpointError(
                    f"{self.name}: the tokenizer has neither a pad nor an end-of-sequence token; "
                    f"set tokenizer.pad_token before building a LocalChatModel"
                )
            # Padding is masked out everywhere, so any real token will do; eos is the convention.
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id: int = int(tokenizer.pad_token_id)
        self.eos_token_ids: tuple[int, ...] = eos_ids(model, tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self.keeps_logits = "logits_to_keep" in forward_parameters(self.model)
        self._warned_truncation = False
        if self.device.type == "cpu":
            tune_cpu_threads()

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> LocalChatModel:
        """Load a causal LM and its tokenizer by reference.

        Args:
            ref: a local folder, a Hugging Face id, or a packaged name (default: the packaged
                SmolLM2-135M-Instruct).
            device: ``"cpu"``, ``"cuda"``, ...; default: the GPU if there is one.
            dtype: default float32 on CPU, bfloat16 (or float16) on GPU.

        Raises:
            CheckpointError: the folder holds no safetensors weights or no causal LM.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder = resolve(ref)
        if not any(Path(folder).glob("*.safetensors")):
            raise CheckpointError(
                f"{ref} holds no .safetensors weights; capplug never loads pickled weights. "
                f"Convert it once with transformers: model.save_pretrained(dir, safe_serialization=True)"
            )
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        device_ = pick_device(device)
        dtype_ = pick_dtype(dtype, device_)
        try:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype_, use_safetensors=True, trust_remote_code=False
                )
        except ValueError as exc:
            raise CheckpointError(
                f"{ref} is not a causal LM that transformers can load "
                f"({', '.join(config.architectures or []) or config.model_type}): {exc}"
            ) from exc
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        return cls(model, tokenizer, device=device_, dtype=dtype_, name=str(ref))

    def __repr__(self) -> str:
        return f"LocalChatModel({self.name!r}, device={self.device.type!r}, dtype={self.dtype})"

    # ----------------------------------------------------------------------------- prompts

    def render(self, prompt: Instruction) -> str:
        """The text the model reads for ``prompt``: its chat template, generation prompt added.

        A plain string becomes one user turn. A tokenizer without a chat template gets the
        prompt's flat text (:func:`capplug.flatten_chat`) instead.
        """
        return self._render(prompt, argument="prompt")

    def _render(self, prompt: Instruction, *, argument: str) -> str:
        turns = chat_turns(prompt, argument=argument)  # validates the shape, names the argument
        if not self.has_chat_template:
            return flatten_chat(prompt, argument=argument)
        messages = [{"role": role, "content": text} for role, text in turns]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        if not isinstance(text, str):  # some tokenizers return a one-item list even for one chat
            text = text[0]
        return text

    def _prompt_ids(self, text: str, *, reserve: int) -> list[int]:
        # The template already holds any BOS it wants; adding special tokens would double it.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else self.eos_token_ids[0]]
        limit = None if self.max_positions is None else self.max_positions - reserve
        if limit is not None and len(ids) > limit:
            if not self._warned_truncation:
                warnings.warn(
                    f"a prompt of {len(ids)} tokens was cut to its last {limit} tokens to fit "
                    f"{self.name}'s {self.max_positions} positions (further cuts are silent)",
                    stacklevel=3,
                )
                self._warned_truncation = True
            ids = ids[-limit:]
        return ids

    def _completion(self, row: list[int]) -> tuple[list[int], bool]:
        """The generated tokens up to and including the first end-of-turn token; and whether it came."""
        for i, token in enumerate(row):
            if token in self.eos_token_ids:
                return row[: i + 1], True
        # Rows that ended early are right-filled with pad, which may equal eos (handled above).
        return row, False

    @torch.inference_mode()
    def log_likelihood(
        self,
        prompts: Sequence[Instruction],
        continuations: Sequence[str],
        *,
        batch_size: int = 16,
        end_of_turn: bool = False,
        progress: bool = False,
    ) -> list[tuple[float, float, int]]:
        """Log-probability of each continuation as the reply to its prompt.

        Returns one ``(sum_logprob, mean_logprob, n_tokens)`` per pair, in input order. The
        prompt is rendered with the chat template (as for generation) and the continuation is
        tokenized on its own and appended, which is how a reply follows the generation prompt.

        An empty continuation (with ``end_of_turn=False``) has no tokens: it gets
        ``(0.0, -inf, 0)``, so a pick by highest mean never chooses it (a pick by highest sum
        always would; pass ``end_of_turn=True`` to charge every reply its stop).

        Args:
            prompts: one instruction per continuation (repeat a prompt to score several options).
            continuations: the replies to score.
            batch_size: sequences per forward pass.
            end_of_turn: also count the end-of-turn token after the continuation, as
                :class:`Candidate` log-probabilities do for finished candidates.
            progress: show a progress bar over batches.
        """
        texts = self._check_prompts(prompts)
        if isinstance(continuations, str) or not isinstance(continuations, Sequence):
            raise TypeError(
                "continuations must be a list of strings, one per prompt; "
                f"got {type(continuations).__name__}"
            )
        if len(continuations) != len(texts):
            raise ValueError(
                f"continuations must match prompts one to one; got {len(continuations)} "
                f"continuations for {len(texts)} prompts (repeat a prompt once per option)"
            )
        for i, item in enumerate(continuations):
            if not isinstance(item, str):
                raise TypeError(f"continuations[{i}] must be a string; got {type(item).__name__}")
        check_positive_int(batch_size, "batch_size")
        cont_ids = [
            self.tokenizer(c, add_special_tokens=False)["input_ids"] if c else []
            for c in continuations
        ]
        if end_of_turn:
            cont_ids = [[*c, self.eos_token_ids[0]] for c in cont_ids]
        longest = max(len(c) for c in cont_ids)
        rendered: dict[str, list[int]] = {}
        prompt_ids = []
        for text in texts:
            if text not in rendered:
                rendered[text] = self._prompt_ids(text, reserve=longest)
            prompt_ids.append(rendered[text])
        return self._score_ids(prompt_ids, cont_ids, batch_size=batch_size, progress=progress)

    def _score_ids(
        self,
        prompts: list[list[int]],
        continuations: list[list[int]],
        *,
        batch_size: int = 16,
        progress: bool = False,
        per_token: list[list[float]] | None = None,
    ) -> list[tuple[float, float, int]]:
        """(sum, mean, count) of each continuation's log-probabilities; with ``per_token``, also
        fills it with each continuation's values, in input order."""
        results: list[tuple[float, float, int]] = [(0.0, float("-inf"), 0)] * len(prompts)
        values_of: list[list[float]] = [[] for _ in prompts]
        todo = [i for i, c in enumerate(continuations) if c]
        todo.sort(key=lambda i: len(prompts[i]) + len(continuations[i]))
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        with progress_bar(len(batches), "log-likelihood", progress) as bar:
            for batch in batches:
                seqs = [prompts[i] + continuations[i] for i in batch]
                lengths = [len(continuations[i]) for i in batch]
                for i, values in zip(
                    batch, self._continuation_logprobs(seqs, lengths), strict=True
                ):
                    total = math.fsum(values)
                    results[i] = (total, total / len(values), len(values))
                    values_of[i] = values
                bar.update(1)
        if per_token is not None:
            per_token[:] = values_of
        return results

    def _continuation_logprobs(
        self, seqs: list[list[int]], lengths: list[int]
    ) -> list[list[float]]:
        """Log-probs of the last ``lengths[i]`` tokens of each sequence, teacher-forced."""
        batch = self.left_pad(seqs)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = max(lengths)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": keep + 1} if self.keeps_logits else {}
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra
        ).logits[:, -(keep + 1) : -1]
        targets = ids[:, -keep:]
        wide = torch.promote_types(logits.dtype, torch.float32)
        logprobs = torch.log_softmax(logits.to(wide), dim=-1).gather(-1, targets[..., None])[..., 0]
        rows = logprobs.cpu().tolist()
        return [row[keep - n :] for row, n in zip(rows, lengths, strict=True)]

    # ----------------------------------------------------------------------------- answers

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Instruction],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        seed: int | None = None,
        batch_size: int = 16,
        progress: bool = False,
        batch_key: Callable[[int], Any] | None = None,
        route: Callable[[list[int]], Any] | None = None,
        **generation_kwargs: Any,
    ) -> list[str]:
        """One answer per prompt, greedy by default; extra keywords go to ``model.generate``.

        Options not given fall back to the checkpoint's own ``generation_config`` (for a sampled
        answer that may mean its temperature or top-p). ``seed`` makes sampling repeatable for
        the same prompts in the same batches; unlike :meth:`sample_candidates` a sampled answer
        may change with the other prompts in its batch.

        Two hooks let a caller decide what each batch runs on (an adapter runtime picking each
        batch's adapters): prompts whose ``batch_key(i)`` is equal batch together, and
        ``route(batch)`` (the prompt indices of a batch) is a context manager yielding the model
        to run and extra ``generate`` keywords for that batch. Without them every batch runs on
        this model.
        """
        texts = self._check_prompts(prompts)
        check_positive_int(max_new_tokens, "max_new_tokens")
        check_positive_int(batch_size, "batch_size")
        for key in ("num_return_sequences", "input_ids", "attention_mask"):
            if key in generation_kwargs:
                raise TypeError(
                    f"generate() sets {key} itself; for several answers per prompt use "
                    f"sample_candidates()"
                )
        ids = [self._prompt_ids(t, reserve=max_new_tokens) for t in texts]
        group = batch_key or (lambda _i: 0)
        order = sorted(range(len(ids)), key=lambda i: (group(i), len(ids[i])))
        return self._answer_batches(
            ids,
            order,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            generation_kwargs=generation_kwargs,
            route=route,
        )

    def _answer_batches(
        self,
        ids: list[list[int]],
        order: list[int],
        *,
        max_new_tokens: int,
        do_sample: bool,
        seed: int | None,
        batch_size: int,
        progress: bool,
        generation_kwargs: Mapping[str, Any],
        route: Callable[[list[int]], Any] | None = None,
    ) -> list[str]:
        """Decode the prompts ``ids`` in batches taken in ``order``; one answer per prompt
        (``route``: as :meth:`generate` says)."""
        answers: list[str] = [""] * len(ids)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        with seeded(seed), progress_bar(len(batches), "generate", progress) as bar:
            for batch in batches:
                enc = self.left_pad([ids[i] for i in batch])
                routing = (
                    route(batch) if route is not None else contextlib.nullcontext((self.model, {}))
                )
                with routing as (model, extra):
                    out = model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        do_sample=do_sample,
                        pad_token_id=self.pad_token_id,
                        **extra,
                        **generation_kwargs,
                    )
                width = enc["input_ids"].shape[1]
                for i, row in zip(batch, out[:, width:].tolist(), strict=True):
                    tokens, _ = self._completion(row)
                    answers[i] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                bar.update(1)
        return answers

    # ----------------------------------------------------------------------------- helpers

    def _check_prompts(self, prompts: Any) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError(
                "prompts must be a list of prompts, not a single string; wrap it: [prompt]"
            )
        if prompts is None or not isinstance(prompts, Sequence):
            raise TypeError(
                f"prompts must be a list of strings or chats; got {type(prompts).__name__}"
            )
        if len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or chats; got 0 items")
        texts = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, Mapping) or (
                not isinstance(prompt, str | Sequence) and hasattr(prompt, "content")
            ):
                raise TypeError(
                    f"prompts[{i}] is a single chat turn ({type(prompt).__name__}); a chat is a list "
                    f"of turns, and prompts is a list of chats: wrap it, [[turn, ...]]"
                )
            texts.append(self._render(prompt, argument=f"prompts[{i}]"))
        return texts

    def left_pad(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token sequences padded on the left into ``input_ids`` and ``attention_mask`` on the
        model's device (decoder-only models generate from the right end)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            if seq:
                ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[r, width - len(seq) :] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
