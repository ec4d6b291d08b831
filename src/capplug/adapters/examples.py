"""Task examples as token sequences for adapter training, and the loss on their answer tokens.

Teacher LoRAs, the hypernetwork's objective and the benchmark all build a prompt the same way:
one user turn holding the task's definition (when the model is to see it), a blank line and the
example's input, rendered with the model's chat template. The answer follows the generation
prompt and ends with the end-of-turn token, which is how a chat model's reply looks.

Sequences are left-padded, so every answer ends at the right edge of the batch: a teacher that
reads the definition and a student that does not line up token for token on the answer, and
only the last ``max answer length + 1`` positions ever need logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from capplug.llms.local import LocalChatModel

_ELLIPSIS = " ..."


def user_prompt(input: str, definition: str | None = None) -> str:
    """The user turn for one example: the definition, a blank line, the input; or the input alone."""
    text = input.strip()
    if definition and definition.strip():
        return f"{definition.strip()}\n\n{text}"
    return text


@dataclass(frozen=True, slots=True)
class Encoded:
    """One example as token ids: the rendered prompt, then the answer the loss is taken on."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    truncated: bool = False
    """The definition, input or answer was cut to fit ``max_length``."""


def encode_example(
    chat: LocalChatModel,
    *,
    input: str,
    answer: str,
    definition: str | None,
    max_length: int,
    max_answer_tokens: int,
) -> Encoded:
    """Tokenize one example to at most ``max_length`` tokens.

    The answer keeps its first ``max_answer_tokens`` tokens (and its end-of-turn token only when
    complete). A prompt that does not fit loses the tail of the definition first, since the
    start of a definition says what the task is; if the input alone is still too long, the
    prompt keeps its last tokens, as :class:`LocalChatModel` does when generating.
    """
    tokenizer = chat.tokenizer
    answer_ids = list(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])
    truncated = len(answer_ids) > max_answer_tokens
    answer_ids = answer_ids[:max_answer_tokens]
    if not truncated:
        answer_ids.append(chat.eos_token_ids[0])
    budget = max(1, max_length - len(answer_ids))
    prompt_ids = _render_ids(chat, user_prompt(input, definition))
    if len(prompt_ids) > budget and definition and definition.strip():
        truncated = True
        def_ids = tokenizer(definition.strip(), add_special_tokens=False)["input_ids"]
        keep = len(def_ids)
        # Token counts shift a little when text is re-joined: shrink until it fits (or is gone).
        while len(prompt_ids) > budget and keep > 0:
            keep = max(0, keep - (len(prompt_ids) - budget) - 2)
            shorter = tokenizer.decode(def_ids[:keep]).strip() + _ELLIPSIS if keep else None
            prompt_ids = _render_ids(chat, user_prompt(input, shorter))
    if len(prompt_ids) > budget:
        truncated = True
        prompt_ids = prompt_ids[-budget:]
    return Encoded(tuple(prompt_ids), tuple(answer_ids), truncated)


def _render_ids(chat: LocalChatModel, user: str) -> list[int]:
    # The template carries any BOS it wants; adding special tokens again would double it.
    return list(chat.tokenizer(chat.render(user), add_special_tokens=False)["input_ids"])


@dataclass
class AnswerLogits:
    """Logits at the answer positions of a left-padded batch; padding rows masked out."""

    logits: torch.Tensor
    """``[batch, K, vocab]``: the prediction of each of the last K tokens of every row."""
    targets: torch.Tensor
    """``[batch, K]``: those tokens."""
    mask: torch.Tensor
    """``[batch, K]`` bool: True where the token belongs to the row's answer."""

    def cross_entropy(self) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens."""
        logprobs = torch.log_softmax(self.logits.float(), dim=-1)
        nll = -logprobs.gather(-1, self.targets[..., None])[..., 0]
        return (nll * self.mask).sum() / self.mask.sum().clamp(min=1)

    def kl_from(self, teacher: AnswerLogits, *, temperature: float = 1.0) -> torch.Tensor:
        """Mean over answer tokens of KL(teacher || self) between next-token distributions."""
        if teacher.logits.shape != self.logits.shape or not torch.equal(teacher.mask, self.mask):
            raise ValueError(
                "teacher and student batches must hold the same answers: their answer positions "
                f"differ ({tuple(teacher.logits.shape)} vs {tuple(self.logits.shape)})"
            )
        t = torch.log_softmax(teacher.logits.float() / temperature, dim=-1)
        s = torch.log_softmax(self.logits.float() / temperature, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1) * temperature**2
        return (kl * self.mask).sum() / self.mask.sum().clamp(min=1)


def answer_logits(
    chat: LocalChatModel, model: torch.nn.Module, batch: Sequence[Encoded]
) -> AnswerLogits:
    """Run ``model`` on the batch, teacher-forced, keeping logits for the answer tokens only."""
    seqs = [list(e.prompt_ids) + list(e.answer_ids) for e in batch]
    lengths = [len(e.answer_ids) for e in batch]
    padded = chat.left_pad(seqs)
    ids, mask = padded["input_ids"], padded["attention_mask"]
    keep = max(lengths)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": keep + 1} if chat.keeps_logits else {}
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra
    ).logits[:, -(keep + 1) : -1]
    targets = ids[:, -keep:]
    index = torch.arange(keep, device=ids.device)[None, :]
    answer_mask = index >= (keep - torch.tensor(lengths, device=ids.device))[:, None]
    return AnswerLogits(logits=logits, targets=targets, mask=answer_mask)


class LoraInjection:
    """Adds ``scaling * x @ A.T @ B.T`` to chosen linear layers of a model, with autograd intact.

    This is how generated weights act during hypernetwork training: the base model stays a
    plain frozen transformers model, and the hypernetwork's output tensors (which carry the
    graph back to it) are applied by forward hooks. ``A`` is ``[r, in]`` or ``[batch, r, in]``
    (one adapter per row), ``B`` is ``[out, r]`` or ``[batch, out, r]``: the same arithmetic as
    peft's LoRA layer without dropout, so an adapter written to disk behaves as it did here.
    """

    def __init__(self, model: torch.nn.Module, modules: Sequence[str]) -> None:
        named = dict(model.named_modules())
        missing = [m for m in modules if m not in named]
        if missing:
            raise ValueError(f"the model has no modules {missing[:3]} to inject LoRA weights into")
        self._modules = {m: named[m] for m in modules}
        self._active: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self._modules.items()
        ]

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            factors = self._active.get(name)
            if factors is None:
                return output
            a, b, scaling = factors
            x = inputs[0]
            if a.dim() == 3:  # one adapter per row: [batch, r, in] against [batch, seq, in]
                delta = torch.bmm(
                    torch.bmm(x, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype)
                )
            else:
                delta = (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype)
            return output + delta * scaling

        return hook

    @contextlib.contextmanager
    def apply(
        self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float
    ) -> Iterator[None]:
        """Within the block, the named modules add their LoRA update; others stay as they are."""
        unknown = [m for m in factors if m not in self._modules]
        if unknown:
            raise ValueError(f"no hook was placed on {unknown[:3]}")
        self._active = {m: (a, b, scaling) for m, (a, b) in factors.items()}
        try:
            yield
        finally:
            self._active = {}

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
