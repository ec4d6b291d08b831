"""A local Hugging Face chat model: chat-template rendering, candidate sampling, log-likelihoods.

:class:`LocalChatModel` loads any causal LM that ``capplug.models.resolve`` can find (the packaged
SmolLM2-135M-Instruct by default) and offers three things the rest of capplug needs:

- :meth:`~LocalChatModel.sample_candidates`: n candidate responses per instruction, by Cappy's
  recipe by default (:data:`CAPPY_RECIPE`), batched across prompts and reproducible;
- :meth:`~LocalChatModel.log_likelihood`: log-probabilities of given continuations, for the LM
  baselines (multiple choice by likelihood, self-scoring of candidates);
- :meth:`~LocalChatModel.generate`: plain batched greedy or sampled answers.

Sampled candidates do not depend on which other prompts share their batch: every sampled row
draws from its own random generator, seeded from ``seed``, the rendered prompt, the strategy
and the sample's index, and the token is picked by inverse-CDF sampling inside a logits
processor, so batch composition only matters through float round-off in the logits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from capplug.models import DEFAULT_CHAT_MODEL, resolve

__all__ = [
    "CAPPY_RECIPE",
    "Candidate",
    "LocalChatModel",
    "SamplingRecipe",
    "SamplingStrategy",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = DEFAULT_CHAT_MODEL


# ------------------------------------------------------------------------------------ recipe


@dataclass(frozen=True)
class SamplingStrategy:
    """One way of drawing candidates: beam search, greedy decoding, or sampling with warpers."""

    n: int = 1
    """How many candidates this strategy contributes per prompt."""
    method: Literal["sample", "beam", "greedy"] = "sample"
    temperature: float = 1.0
    """Sampling temperature (``sample`` only); 1.0 leaves the distribution as it is."""
    top_k: int | None = None
    """Keep only the ``top_k`` most likely tokens (``sample`` only); ``None`` or 0: no cut."""
    top_p: float | None = None
    """Nucleus sampling mass (``sample`` only); ``None`` or 1.0: no cut."""
    num_beams: int = 4
    """Beam width (``beam`` only); the ``n`` best finished beams are returned."""

    def __post_init__(self) -> None:
        where = f"SamplingStrategy({self.method!r})"
        if self.method not in ("sample", "beam", "greedy"):
            raise ValueError(
                f"SamplingStrategy.method must be 'sample', 'beam' or 'greedy'; got {self.method!r}"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{where}.n must be an integer >= 1; got {self.n!r}")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise ValueError(
                f"{where}.temperature must be a number > 0 (use method='greedy' for argmax "
                f"decoding); got {self.temperature!r}"
            )
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(f"{where}.top_k must be None or an integer >= 0; got {self.top_k!r}")
        if self.top_p is not None and not (
            isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"{where}.top_p must be None or in (0, 1]; got {self.top_p!r}")
        if (
            isinstance(self.num_beams, bool)
            or not isinstance(self.num_beams, int)
            or self.num_beams < 1
        ):
            raise ValueError(f"{where}.num_beams must be an integer >= 1; got {self.num_beams!r}")
        if self.method == "beam" and self.n > self.num_beams:
            raise ValueError(
                f"{where}.n={self.n} asks for more outputs than num_beams={self.num_beams}; "
                f"raise num_beams or lower n"
            )
        if self.method == "greedy" and self.n != 1:
            raise ValueError(
                f"{where}.n must be 1: greedy decoding gives the same output every time; got {self.n}"
            )

    @property
    def name(self) -> str:
        """A short settings string: ``beam4``, ``greedy``, ``sample``, ``temp0.9``, ``topk40-topp0.95``."""
        if self.method == "beam":
            return f"beam{self.num_beams}"
        if self.method == "greedy":
            return "greedy"
        parts = []
        if self.temperature != 1.0:
            parts.append(f"temp{self.temperature:g}")
        if self.top_k:
            parts.append(f"topk{self.top_k}")
        if self.top_p is not None and self.top_p < 1.0:
            parts.append(f"topp{self.top_p:g}")
        return "-".join(parts) or "sample"


@dataclass(frozen=True)
class SamplingRecipe:
    """The strategies that together make a prompt's candidates, and their length limit."""

    strategies: tuple[SamplingStrategy, ...]
    max_new_tokens: int = 64
    """The most tokens any one candidate may have (its end-of-turn token included)."""

    def __post_init__(self) -> None:
        strategies = self.strategies
        if isinstance(strategies, SamplingStrategy) or not isinstance(strategies, Sequence):
            raise TypeError(
                "SamplingRecipe.strategies must be a list of SamplingStrategy; "
                f"got {type(strategies).__name__}"
            )
        if len(strategies) == 0:
            raise ValueError("SamplingRecipe.strategies must hold at least one SamplingStrategy")
        for i, strategy in enumerate(strategies):
            if not isinstance(strategy, SamplingStrategy):
                raise TypeError(
                    f"SamplingRecipe.strategies[{i}] must be a SamplingStrategy; "
                    f"got {type(strategy).__name__}"
                )
        object.__setattr__(self, "strategies", tuple(strategies))
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(
                f"SamplingRecipe.max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}"
            )

    @property
    def n_candidates(self) -> int:
        """How many candidates the recipe makes per prompt."""
        return sum(s.n for s in self.strategies)


CAPPY_RECIPE = SamplingRecipe(
    strategies=(
        SamplingStrategy(method="beam", n=1, num_beams=4),
        SamplingStrategy(n=4),
        SamplingStrategy(n=4, temperature=0.9),
        SamplingStrategy(n=4, top_k=40),
        SamplingStrategy(n=4, top_p=0.95),
    ),
    max_new_tokens=64,
)
"""Cappy's candidate recipe: 1 beam-search output (4 beams), then 4 each of plain sampling,
temperature 0.9, top-k 40 and top-p 0.95; at most 64 new tokens. Each sampling strategy applies
only its own warper (no top-k 50 default sneaks in)."""

FAST_RECIPE = SamplingRecipe(
    strategies=(
        SamplingStrategy(method="beam", n=1, num_beams=4),
        SamplingStrategy(n=2),
        SamplingStrategy(n=2, temperature=0.9),
        SamplingStrategy(n=2, top_k=40),
        SamplingStrategy(n=2, top_p=0.95),
    ),
    max_new_tokens=48,
)
"""Cappy's recipe at about a third of the cost, for labelling training data on a CPU: the same
strategies with 2 samples each instead of 4 (9 candidates) and at most 48 new tokens."""

RECIPES = {"cappy": CAPPY_RECIPE, "fast": FAST_RECIPE}
"""Recipes by the names the command line uses."""


@dataclass(frozen=True)
class Candidate:
    """One generated response with its log-probability under the model.

    ``sum_logprob`` and ``mean_logprob`` are taken over the generated tokens under the model's
    unmodified next-token distribution (log-softmax of the raw logits, not the temperature- or
    top-k-warped one). The end-of-turn token counts as a generated token when the model stopped
    on its own (``finished``), so an early stop is charged its probability.
    """

    text: str
    """The decoded response, special tokens removed, surrounding whitespace trimmed."""
    strategy: str
    """The settings that drew it (:attr:`SamplingStrategy.name`), e.g. ``beam4`` or ``topp0.95``."""
    sum_logprob: float
    mean_logprob: float
    n_tokens: int
    finished: bool = True
    """False when the candidate was cut at ``max_new_tokens`` instead of ending its turn."""
    token_ids: tuple[int, ...] = field(default=(), repr=False)
    """The generated token ids, end-of-turn token included when ``finished``."""
    token_logprobs: tuple[float, ...] = field(default=(), repr=False)
    """Each generated token's log-probability (as ``sum_logprob`` counts them), in order."""


# ------------------------------------------------------------------------------------- model


class LocalChatModel:
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
        self.eos_token_ids: tuple[int, ...] = _eos_ids(model, tokenizer)
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

    # --------------------------------------------------------------------------- candidates

    @torch.inference_mode()
    def sample_candidates(
        self,
        prompts: Sequence[Instruction],
        *,
        recipe: SamplingRecipe = CAPPY_RECIPE,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = True,
        streamer: Any = None,
    ) -> list[list[Candidate]]:
        """Draw candidates for every prompt by ``recipe``; one list per prompt, in input order.

        Each prompt's candidates come in the recipe's strategy order. The same prompt, recipe and
        ``seed`` give the same candidates whatever other prompts are passed along with it.

        Args:
            prompts: instructions (strings or chats).
            recipe: the strategies to use (default: Cappy's 17 candidates).
            seed: base seed; each (prompt, strategy, sample) gets its own seed derived from it.
            batch_size: prompts per generation call. Sampling runs ``batch_size`` times the
                recipe's sampled candidates per prompt as rows at once (16 x 16 for Cappy's).
            progress: show a progress bar over prompt batches.
            streamer: a transformers streamer (``put(token_ids)``, ``end()``) that sees the
                tokens as they are drawn; only for one prompt and one sampled candidate.
        """
        texts = self._check_prompts(prompts)
        if not isinstance(recipe, SamplingRecipe):
            raise TypeError(f"recipe must be a SamplingRecipe; got {type(recipe).__name__}")
        check_positive_int(batch_size, "batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer; got {type(seed).__name__}")
        if streamer is not None and (
            len(texts) != 1
            or len(recipe.strategies) != 1
            or recipe.strategies[0].method == "beam"
            or recipe.strategies[0].n != 1
        ):
            raise ValueError("streamer needs one prompt and a recipe of one sampled candidate")
        ids = [self._prompt_ids(t, reserve=recipe.max_new_tokens) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[list[Candidate]] = [[] for _ in ids]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        with _generation_defaults(self), _progress(len(batches), "candidates", progress) as bar:
            for batch in batches:
                drawn = self._candidates_for_batch(
                    [ids[i] for i in batch], [texts[i] for i in batch], recipe, seed, streamer
                )
                for i, candidates in zip(batch, drawn, strict=True):
                    results[i] = candidates
                bar.update(1)
        return results

    def _candidates_for_batch(
        self,
        ids: list[list[int]],
        texts: list[str],
        recipe: SamplingRecipe,
        seed: int,
        streamer: Any = None,
    ) -> list[list[Candidate]]:
        per_strategy: list[list[list[Candidate]]] = []
        sampled = [(k, s) for k, s in enumerate(recipe.strategies) if s.method != "beam"]
        sampled_out: dict[int, list[list[Candidate]]] = {}
        if sampled:
            rows = [
                _Row(texts[p], k, s, j, seed)
                for p in range(len(ids))
                for k, s in sampled
                for j in range(s.n)
            ]
            drawn = self._sample_rows(ids, rows, recipe.max_new_tokens, streamer)
            per_prompt = len(rows) // len(ids)
            for p in range(len(ids)):
                chunk = drawn[p * per_prompt : (p + 1) * per_prompt]
                for k, _ in sampled:
                    sampled_out.setdefault(k, []).append(
                        [c for c, row in zip(chunk, rows[:per_prompt], strict=True) if row.k == k]
                    )
        for k, strategy in enumerate(recipe.strategies):
            if strategy.method == "beam":
                per_strategy.append(self._beam(ids, strategy, recipe.max_new_tokens))
            else:
                per_strategy.append(sampled_out[k])
        return [[c for strat in per_strategy for c in strat[p]] for p in range(len(ids))]

    def _beam(
        self, ids: list[list[int]], strategy: SamplingStrategy, max_new_tokens: int
    ) -> list[list[Candidate]]:
        batch = self.left_pad(ids)
        out = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=strategy.num_beams,
            num_return_sequences=strategy.n,
        )
        width = batch["input_ids"].shape[1]
        completions = [self._completion(row) for row in out[:, width:].tolist()]
        prompts = [p for p in ids for _ in range(strategy.n)]
        per_token: list[list[float]] = []
        scores = self._score_ids(prompts, [c for c, _ in completions], per_token=per_token)
        candidates = [
            self._candidate(tokens, finished, strategy.name, score, values)
            for (tokens, finished), score, values in zip(
                completions, scores, per_token, strict=True
            )
        ]
        return [candidates[p * strategy.n : (p + 1) * strategy.n] for p in range(len(ids))]

    def _sample_rows(
        self, ids: list[list[int]], rows: list[_Row], max_new_tokens: int, streamer: Any = None
    ) -> list[Candidate]:
        repeats = len(rows) // len(ids)
        batch = self.left_pad(ids)
        input_ids = batch["input_ids"].repeat_interleave(repeats, dim=0)
        attention_mask = batch["attention_mask"].repeat_interleave(repeats, dim=0)
        kwargs: dict[str, Any] = {} if streamer is None else {"streamer": streamer}
        cache = self._prefill(batch, repeats)
        if cache is not None:
            kwargs[self._cache_argument] = cache
        sampler = _RowSampler(rows, device=self.device)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,  # the sampler picks every token; greedy then keeps its pick
            num_beams=1,
            logits_processor=[sampler],
            **kwargs,
        )
        width = input_ids.shape[1]
        logprobs = sampler.logprobs()
        candidates = []
        for r, row in enumerate(out[:, width:].tolist()):
            tokens, finished = self._completion(row)
            values = logprobs[r, : len(tokens)].tolist()
            total = math.fsum(values)
            score = (total, total / len(tokens) if tokens else float("-inf"), len(tokens))
            candidates.append(
                self._candidate(tokens, finished, rows[r].strategy.name, score, values)
            )
        return candidates

    def _prefill(self, batch: Mapping[str, torch.Tensor], repeats: int) -> Any | None:
        """Run the shared prompts once and copy their cache to every row, instead of once per row."""
        from transformers import DynamicCache

        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        supports = getattr(self.model, "_supports_default_dynamic_cache", lambda: False)
        if repeats == 1 or input_ids.shape[1] < 2 or not supports():
            return None
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # generate() feeds only the tokens past the cache, so leave the last one for it.
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            **{self._cache_argument: cache},
            use_cache=True,
            **({"logits_to_keep": 1} if self.keeps_logits else {}),
        )
        cache.batch_repeat_interleave(repeats)
        return cache

    @functools.cached_property
    def _cache_argument(self) -> str:
        """``cache`` where the model takes it (transformers 5.25 on), else ``past_key_values``
        (which the newer versions warn about on every call)."""
        inner = getattr(self.model, "get_base_model", None)  # a peft wrapper passes it on
        parameters = inspect.signature((inner() if inner else self.model).forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _completion(self, row: list[int]) -> tuple[list[int], bool]:
        """The generated tokens up to and including the first end-of-turn token; and whether it came."""
        for i, token in enumerate(row):
            if token in self.eos_token_ids:
                return row[: i + 1], True
        # Rows that ended early are right-filled with pad, which may equal eos (handled above).
        return row, False

    def _candidate(
        self,
        tokens: list[int],
        finished: bool,
        strategy: str,
        score: tuple[float, float, int],
        token_logprobs: Sequence[float] = (),
    ) -> Candidate:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Candidate(
            text=text,
            strategy=strategy,
            sum_logprob=score[0],
            mean_logprob=score[1],
            n_tokens=score[2],
            finished=finished,
            token_ids=tuple(tokens),
            token_logprobs=tuple(float(v) for v in token_logprobs),
        )

    # -------------------------------------------------------------------------- likelihood

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
        with _progress(len(batches), "log-likelihood", progress) as bar:
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
        with seeded(seed), _progress(len(batches), "generate", progress) as bar:
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


# ---------------------------------------------------------------------------- row sampling


@dataclass(frozen=True)
class _Row:
    """One sampled sequence: which prompt, which strategy (by recipe position), which draw."""

    prompt: str
    k: int
    strategy: SamplingStrategy
    j: int
    seed: int

    def row_seed(self) -> int:
        key = f"{self.seed}\x00{self.k}:{self.strategy.name}\x00{self.j}\x00{self.prompt}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class _RowSampler:
    """A logits processor that picks each row's next token itself, with the row's own generator.

    It sees the raw logits (``_generation_defaults`` leaves no other processor in front of it),
    records their log-softmax at the chosen token, applies the row's temperature, top-k and
    top-p, draws by inverse CDF from one uniform number, and returns scores that are -inf
    everywhere but the pick, so greedy decoding in ``generate`` keeps it.
    """

    rows: list[_Row]
    device: torch.device
    _generators: list[torch.Generator] = field(init=False)
    _groups: dict[tuple[str, float, int, float], torch.Tensor] = field(init=False)
    _steps: list[torch.Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self._generators = [
            torch.Generator(device=gen_device).manual_seed(r.row_seed()) for r in self.rows
        ]
        groups: dict[tuple[str, float, int, float], list[int]] = {}
        for i, row in enumerate(self.rows):
            s = row.strategy
            key = (s.method, float(s.temperature), int(s.top_k or 0), float(s.top_p or 1.0))
            groups.setdefault(key, []).append(i)
        self._groups = {k: torch.tensor(v, device=self.device) for k, v in groups.items()}
        self._gen_device = gen_device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = scores.float()
        chosen = torch.empty(raw.shape[0], dtype=torch.long, device=raw.device)
        uniforms = torch.cat(
            [torch.rand(1, generator=g, device=self._gen_device) for g in self._generators]
        ).to(raw.device)
        for (method, temperature, top_k, top_p), index in self._groups.items():
            logits = raw.index_select(0, index)
            if method == "greedy":
                chosen[index] = logits.argmax(-1)
                continue
            chosen[index] = _draw(logits, uniforms[index], temperature, top_k, top_p)
        self._steps.append(torch.log_softmax(raw, dim=-1).gather(-1, chosen[:, None])[:, 0])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen[:, None], 0.0)
        return out

    def logprobs(self) -> torch.Tensor:
        if not self._steps:
            return torch.zeros((len(self.rows), 0))
        return torch.stack(self._steps, dim=1).cpu()


def _draw(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Sample one token per row by inverse CDF, after transformers' warpers in their order."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # As TopPLogitsWarper: drop the least likely tokens whose total mass is <= 1 - top_p.
        sorted_logits, sorted_index = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_index, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True)[:, 0]
    # Round-off can push the target past the last step of the CDF: take the last possible token.
    last = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(picked, last)


# ------------------------------------------------------------------------------- utilities


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for token in [value] if isinstance(value, int) else list(value):
            if int(token) not in found:
                found.append(int(token))
    if not found:
        raise CheckpointError(
            "the model names no end-of-sequence token (generation_config.eos_token_id or "
            "tokenizer.eos_token); set one so generation knows where a reply ends"
        )
    return tuple(found)


@contextlib.contextmanager
def _generation_defaults(chat: LocalChatModel) -> Iterator[None]:
    """Swap in a neutral generation config, so the recipe alone decides how candidates are drawn.

    ``generate`` fills every option left unset from the checkpoint's ``generation_config``; a
    checkpoint shipping a repetition penalty or ``do_sample=True`` would otherwise change the
    recipe (and the raw logits the sampler records).
    """
    from transformers import GenerationConfig

    model = chat.model
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=list(chat.eos_token_ids),
        pad_token_id=chat.pad_token_id,
        bos_token_id=getattr(saved, "bos_token_id", None),
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        early_stopping=False,
    )
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", disable=not enabled or total == 0)
    try:
        yield bar
    finally:
        bar.close()
