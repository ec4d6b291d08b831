"""One LoRA training run over a base model: its settings, its loop and what it writes.

:mod:`capplug.training.teacher_lora` decides what a run trains on (one task, all of them, or the
multi-task mix); :class:`LoraRun` trains it through :class:`capplug.training.loop.Loop` and writes
the peft folder and ``training_summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from capplug._runtime import seeded
from capplug.adapters.examples import Encoded, answer_logits, encode_example
from capplug.adapters.runtime import quiet_peft
from capplug.data import Example
from capplug.llms.local import LocalChatModel
from capplug.models.adapter_folder import (
    META_BASE_ARCHITECTURE,
    META_BASE_MODEL,
    BaseModelIdentity,
    write_peft_folder,
)
from capplug.training.loop import (
    LOG_FILE,
    SUMMARY_FILE,
    Loop,
    Precision,
    Schedule,
    check_float,
    check_int,
)

__all__ = ["LoraRun", "LoraTrainConfig", "LoraTrainResult", "clear_run", "finished_run"]

logger = logging.getLogger("capplug.training.teacher_lora")


@dataclass(frozen=True)
class LoraTrainConfig:
    """Settings of one teacher LoRA run; the defaults suit SmolLM2-135M on a CPU."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha: the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the linear layers that get an adapter, in every transformer layer."""
    steps: int = 64
    """Optimizer steps; with batch 4 a task's adapter sees 256 examples."""
    batch_size: int = 4
    lr: float = 5e-4
    """Peak AdamW learning rate, reached after ``warmup_steps`` and decayed linearly to zero."""
    warmup_steps: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    """Token cap per example (definition + input + answer); longer ones are cut, definition first."""
    max_answer_tokens: int = 64
    """Answer tokens kept per example: the benchmark generates at most 64."""
    precision: Precision = "fp32"
    """``bf16`` runs the forward pass under bfloat16 autocast (weights stay float32)."""
    seed: int = 0
    checkpoint_every: int = 16
    log_every: int = 4
    eval_examples: int = 16
    """Test examples of the task whose loss is measured before and after training (0: none)."""

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "steps", "batch_size", "max_length", "max_answer_tokens"):
            check_int(getattr(self, name), name)
        for name in ("checkpoint_every", "log_every"):
            check_int(getattr(self, name), name)
        for name in ("warmup_steps", "eval_examples", "seed"):
            check_int(getattr(self, name), name, minimum=0)
        check_float(self.lr, "lr")
        check_float(self.weight_decay, "weight_decay", inclusive=True)
        check_float(self.max_grad_norm, "max_grad_norm")
        check_float(self.dropout, "dropout", inclusive=True)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be below 1; got {self.dropout}")
        if self.max_answer_tokens >= self.max_length:
            raise ValueError(
                f"max_answer_tokens ({self.max_answer_tokens}) must be below max_length "
                f"({self.max_length}) to leave room for the prompt"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16'; got {self.precision!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules must name at least one linear layer, e.g. ('q_proj', 'v_proj'); "
                f"got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", targets)

    def run_settings(self) -> dict[str, Any]:
        """The settings that decide the trained weights (not how often to log or save)."""
        settings = asdict(self)
        for name in ("checkpoint_every", "log_every", "eval_examples"):
            settings.pop(name)
        return settings


@dataclass
class LoraTrainResult:
    """What a finished teacher run reports."""

    task: str
    out_dir: Path
    steps: int
    train_examples: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    wall_seconds: float
    skipped: bool = False
    """True when the adapter was already there and nothing was trained."""
    timing: dict[str, float] = field(default_factory=dict)


def finished_run(folder: Path, run_id: str) -> LoraTrainResult | None:
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file() or not (folder / "adapter_config.json").is_file():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("run_id") != run_id:
        return None
    return LoraTrainResult(
        task=summary["task"],
        out_dir=folder,
        steps=summary["steps"],
        train_examples=summary["train_examples"],
        eval_loss_before=summary.get("eval_loss_before"),
        eval_loss_after=summary.get("eval_loss_after"),
        wall_seconds=summary["wall_seconds"],
        skipped=True,
        timing=summary.get("timing", {}),
    )


def clear_run(folder: Path) -> None:
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    for name in (SUMMARY_FILE, LOG_FILE, "adapter_config.json", "adapter_model.safetensors"):
        (folder / name).unlink(missing_ok=True)


class LoraRun:
    """One LoRA training run (a teacher, a ceiling or the multi-task mix), fresh or resumed."""

    def __init__(
        self,
        label: str,
        examples: list[tuple[str, Example]],
        heldout: list[tuple[str, Example]],
        folder: Path,
        chat: LocalChatModel,
        identity: BaseModelIdentity,
        config: LoraTrainConfig,
        run_id: str,
        *,
        metadata: dict[str, str],
        summary: dict[str, Any],
        bar_label: str = "",
    ) -> None:
        self.label = label
        self.bar_label = bar_label or label
        """The task's name (or :data:`MULTITASK`), as logs, summary and result name the run."""
        self.examples = examples
        """``(definition, example)`` pairs to train on."""
        self.heldout = heldout
        self.folder = folder
        self.chat = chat
        self.identity = identity
        self.config = config
        self.run_id = run_id
        self.metadata = metadata
        self.summary_extra = summary
        self._encoded: dict[int, Encoded] = {}
        self._orders: dict[int, list[int]] = {}

    def launch(
        self,
        *,
        resume: bool,
        progress: bool,
        on_step: Callable[[int, dict[str, Any]], None] | None,
    ) -> LoraTrainResult:
        """Train, resume, or hand back the finished adapter already in the folder."""
        finished = finished_run(self.folder, self.run_id)
        if finished is not None and resume:
            return finished
        self.folder.mkdir(parents=True, exist_ok=True)
        if not resume:
            clear_run(self.folder)
        elif (self.folder / SUMMARY_FILE).is_file():
            raise ValueError(
                f"{self.folder} holds an adapter trained with other settings or data; give a new "
                f"out folder, or resume=False (--restart) to train over it"
            )
        return self.train(progress=progress, on_step=on_step)

    def _encode(self, item: tuple[str, Example]) -> Encoded:
        definition, example = item
        return encode_example(
            self.chat,
            input=example.input,
            answer=example.targets[0],
            definition=definition,
            max_length=self.config.max_length,
            max_answer_tokens=self.config.max_answer_tokens,
        )

    def _batch(self, step: int) -> list[Encoded]:
        """The examples of one step: epoch-wise shuffles fixed by the seed, so resume is exact."""
        n, size = len(self.examples), self.config.batch_size
        batch = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            if epoch not in self._orders:
                order = list(range(n))
                random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
                self._orders = {epoch: order}
            index = self._orders[epoch][offset]
            if index not in self._encoded:
                self._encoded[index] = self._encode(self.examples[index])
            batch.append(self._encoded[index])
        return batch

    def train(
        self, *, progress: bool, on_step: Callable[[int, dict[str, Any]], None] | None
    ) -> LoraTrainResult:
        from peft import LoraConfig, get_peft_model

        config, chat = self.config, self.chat
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        base = chat.model
        base.requires_grad_(False)
        with seeded(config.seed), quiet_peft():
            model = get_peft_model(base, lora)
        try:
            return self._train(model, progress=progress, on_step=on_step)
        finally:
            # Give the caller its plain base model back, whatever happened.
            chat.model = model.unload()
            chat.model.eval()

    def _train(
        self,
        model: Any,
        *,
        progress: bool,
        on_step: Callable[[int, dict[str, Any]], None] | None,
    ) -> LoraTrainResult:

        config, chat = self.config, self.chat
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loop = Loop(
            self.folder,
            params,
            Schedule(
                steps=config.steps,
                lr=config.lr,
                warmup_steps=config.warmup_steps,
                max_grad_norm=config.max_grad_norm,
                log_every=config.log_every,
                checkpoint_every=config.checkpoint_every,
                precision=config.precision,
                weight_decay=config.weight_decay,
            ),
            run_id=self.run_id,
            device=chat.device,
            label=self.bar_label,
            other_run="other settings or data; give a new out folder, or resume=False "
            "(--restart) to start over",
            state={"eval_loss_before": None},
            progress=progress,
            on_step=on_step,
        )
        if not loop.start(seed=config.seed + 1):
            loop.state["eval_loss_before"] = self._heldout_loss(model, loop)

        def step_fn(step: int, micro: int) -> dict[str, Any]:
            batch = self._batch(step)
            out = answer_logits(chat, model, batch)
            tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for e in batch)
            return {"loss": out.cross_entropy(), "tokens": tokens}

        result = loop.run(step_fn, models=(model,))
        state, wall = result.state, result.wall_seconds
        eval_after = self._heldout_loss(model, loop)
        self._write_adapter(model)
        loop.finish(
            result,
            task=self.label,
            base_model=self.identity.name,
            train_examples=len(self.examples),
            truncated_examples_seen=sum(e.truncated for e in self._encoded.values()),
            eval_examples=len(self.heldout),
            eval_loss_before=state["eval_loss_before"],
            eval_loss_after=eval_after,
            settings=asdict(self.config),
            **self.summary_extra,
        )
        return LoraTrainResult(
            task=self.label,
            out_dir=self.folder,
            steps=state["step"],
            train_examples=len(self.examples),
            eval_loss_before=state["eval_loss_before"],
            eval_loss_after=eval_after,
            wall_seconds=wall,
            timing=result.timing,
        )

    def _write_adapter(self, model: Any) -> None:
        """The trained LoRA as a peft folder, with the base model it was made for."""
        from peft import get_peft_model_state_dict

        lora = model.peft_config["default"]
        lora.base_model_name_or_path = self.identity.name
        lora.inference_mode = True
        write_peft_folder(
            # save_embedding_layers=False: "auto" looks the base model up on the hub.
            get_peft_model_state_dict(model, save_embedding_layers=False),
            lora,
            self.folder,
            metadata={
                META_BASE_MODEL: self.identity.name,
                META_BASE_ARCHITECTURE: self.identity.architecture,
                **self.metadata,
                "capplug_source": "capplug.training.teacher_lora",
            },
        )

    @torch.no_grad()
    def _heldout_loss(self, model: torch.nn.Module, loop: Loop) -> float | None:
        """Mean answer-token loss on the task's first test examples (no dropout)."""
        if not self.heldout:
            return None
        was_training = model.training
        model.eval()
        total = count = 0.0
        size = self.config.batch_size
        encoded = [self._encode(e) for e in self.heldout]
        for start in range(0, len(encoded), size):
            batch = encoded[start : start + size]
            with loop.autocast():
                out = answer_logits(self.chat, model, batch)
            tokens = float(out.mask.sum())
            total += out.cross_entropy().item() * tokens
            count += tokens
        model.train(was_training)
        return total / count if count else math.nan
