"""Decoding helpers of :class:`~capplug.llms.local.LocalChatModel`: the per-row sampler that
makes candidates independent of their batch, the neutral generation config it runs under, the
model's end-of-turn tokens, and progress bars."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from capplug.errors import CheckpointError
from capplug.llms.local.recipes import SamplingStrategy

if TYPE_CHECKING:
    from capplug.llms.local.model import LocalChatModel


@dataclass(frozen=True)
class Row:
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
class RowSampler:
    """A logits processor that picks each row's next token itself, with the row's own generator.

    It sees the raw logits (``generation_defaults`` leaves no other processor in front of it),
    records their log-softmax at the chosen token, applies the row's temperature, top-k and
    top-p, draws by inverse CDF from one uniform number, and returns scores that are -inf
    everywhere but the pick, so greedy decoding in ``generate`` keeps it.
    """

    rows: list[Row]
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
            chosen[index] = draw(logits, uniforms[index], temperature, top_k, top_p)
        self._steps.append(torch.log_softmax(raw, dim=-1).gather(-1, chosen[:, None])[:, 0])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen[:, None], 0.0)
        return out

    def logprobs(self) -> torch.Tensor:
        if not self._steps:
            return torch.zeros((len(self.rows), 0))
        return torch.stack(self._steps, dim=1).cpu()


def draw(
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


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
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
def generation_defaults(chat: LocalChatModel) -> Iterator[None]:
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
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", disable=not enabled or total == 0)
    try:
        yield bar
    finally:
        bar.close()
