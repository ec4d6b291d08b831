"""Candidate sampling, mixed into :class:`~capplug.llms.local.LocalChatModel`: every prompt's
candidates by a recipe, beams and sampled rows batched, each row reproducible on its own."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from capplug._runtime import check_positive_int
from capplug.chat import Instruction
from capplug.llms.local._decoding import Row, RowSampler, generation_defaults, progress_bar
from capplug.llms.local.recipes import CAPPY_RECIPE, Candidate, SamplingRecipe, SamplingStrategy

if TYPE_CHECKING:
    from capplug.llms.local.model import LocalChatModel


class CandidateSampling:
    """:meth:`sample_candidates` and the steps behind it; a base of ``LocalChatModel``, whose
    model, tokenizer and token helpers every method uses (hence ``self: LocalChatModel``)."""

    @torch.inference_mode()
    def sample_candidates(
        self: LocalChatModel,
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
        with generation_defaults(self), progress_bar(len(batches), "candidates", progress) as bar:
            for batch in batches:
                drawn = self._candidates_for_batch(
                    [ids[i] for i in batch], [texts[i] for i in batch], recipe, seed, streamer
                )
                for i, candidates in zip(batch, drawn, strict=True):
                    results[i] = candidates
                bar.update(1)
        return results

    def _candidates_for_batch(
        self: LocalChatModel,
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
                Row(texts[p], k, s, j, seed)
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
        self: LocalChatModel, ids: list[list[int]], strategy: SamplingStrategy, max_new_tokens: int
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
        self: LocalChatModel,
        ids: list[list[int]],
        rows: list[Row],
        max_new_tokens: int,
        streamer: Any = None,
    ) -> list[Candidate]:
        repeats = len(rows) // len(ids)
        batch = self.left_pad(ids)
        input_ids = batch["input_ids"].repeat_interleave(repeats, dim=0)
        attention_mask = batch["attention_mask"].repeat_interleave(repeats, dim=0)
        kwargs: dict[str, Any] = {} if streamer is None else {"streamer": streamer}
        cache = self._prefill(batch, repeats)
        if cache is not None:
            kwargs[self._cache_argument] = cache
        sampler = RowSampler(rows, device=self.device)
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

    def _prefill(
        self: LocalChatModel, batch: Mapping[str, torch.Tensor], repeats: int
    ) -> Any | None:
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
    def _cache_argument(self: LocalChatModel) -> str:
        """``cache`` where the model takes it (transformers 5.25 on), else ``past_key_values``
        (which the newer versions warn about on every call)."""
        inner = getattr(self.model, "get_base_model", None)  # a peft wrapper passes it on
        parameters = inspect.signature((inner() if inner else self.model).forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _candidate(
        self: LocalChatModel,
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
