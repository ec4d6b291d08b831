"""One hypernetwork training run: its settings, its loss terms, its loop and what it writes.

:mod:`capplug.training.hypernetwork` finds the teachers and tasks a run trains on;
:class:`HypernetRun` trains it through :class:`capplug.training.loop.Loop` (the objective is in
that module's docstring).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from capplug.adapters.examples import (
    AnswerLogits,
    Encoded,
    LoraInjection,
    answer_logits,
    encode_example,
)
from capplug.adapters.hypernetwork import (
    CONFIG_FILE,
    Hypernetwork,
)
from capplug.data import Example, Task
from capplug.llms.local import LocalChatModel
from capplug.models.adapter_folder import (
    AdapterFiles,
)
from capplug.training.loop import (
    Loop,
    Precision,
    Schedule,
    autocast,
    check_float,
    check_int,
)

__all__ = [
    "Factors",
    "HypernetRun",
    "HypernetTrainConfig",
    "HypernetTrainResult",
    "relative_weight_error",
]

logger = logging.getLogger("capplug.training.hypernetwork")


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class HypernetTrainConfig:
    """Settings of a hypernetwork training run; the defaults suit SmolLM2-135M on a CPU."""

    steps: int = 1000
    """Optimizer steps in all, the reconstruction-only warm start included."""
    reconstruction_steps: int = 200
    """First steps on ``L_weights`` alone over every task (no language-model pass: fast)."""
    tasks_per_step: int = 4
    examples_per_task: int = 2
    """A full step's batch is ``tasks_per_step * examples_per_task`` examples."""
    lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lambda_kl: float = 1.0
    lambda_weights: float = 1.0
    kl_temperature: float = 1.0
    student_definition_rate: float = 0.0
    """Share of training rows whose student also reads the definition (0: never, as in TAGI);
    above 0 the adapters also learn to work beside the definition in the prompt."""
    max_length: int = 256
    max_answer_tokens: int = 64
    precision: Precision = "fp32"
    seed: int = 0
    checkpoint_every: int = 25
    log_every: int = 5
    eval_every: int = 100
    """Steps between held-out evaluations (after the warm start); the best is kept in ``best/``."""
    eval_examples_per_task: int = 1
    """Test examples of each train task in the held-out evaluation (0: no evaluation)."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "tasks_per_step",
            "examples_per_task",
            "max_length",
            "max_answer_tokens",
            "checkpoint_every",
            "log_every",
            "eval_every",
        ):
            check_int(getattr(self, name), name)
        for name in ("reconstruction_steps", "warmup_steps", "seed", "eval_examples_per_task"):
            check_int(getattr(self, name), name, minimum=0)
        if self.reconstruction_steps > self.steps:
            raise ValueError(
                f"reconstruction_steps ({self.reconstruction_steps}) cannot exceed steps "
                f"({self.steps})"
            )
        check_float(self.lr, "lr")
        check_float(self.kl_temperature, "kl_temperature")
        check_float(self.max_grad_norm, "max_grad_norm")
        for name in ("weight_decay", "lambda_kl", "lambda_weights"):
            check_float(getattr(self, name), name, inclusive=True)
        rate = self.student_definition_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"student_definition_rate must be in [0, 1]; got {rate!r}")
        if self.max_answer_tokens >= self.max_length:
            raise ValueError(
                f"max_answer_tokens ({self.max_answer_tokens}) must be below max_length "
                f"({self.max_length})"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16'; got {self.precision!r}")

    def run_settings(self) -> dict[str, Any]:
        settings = asdict(self)
        for name in ("checkpoint_every", "log_every"):
            settings.pop(name)
        if not self.student_definition_rate:
            settings.pop("student_definition_rate")  # runs from before the setting still resume
        return settings


@dataclass
class HypernetTrainResult:
    out_dir: Path
    steps: int
    tasks: list[str]
    best_eval: dict[str, float] | None
    wall_seconds: float
    timing: dict[str, float] = field(default_factory=dict)


def relative_weight_error(
    generated: Factors, teacher: Factors, *, scaling: float, teacher_scaling: float
) -> torch.Tensor:
    """Mean over tasks of ``sum ||dW_gen - dW_teacher||^2 / sum ||dW_teacher||^2``.

    ``dW = scaling * B @ A`` per module and layer; factors are ``A [T, L, r, in]`` and
    ``B [T, L, out, r]``, the ranks of the two sides may differ. The distance is taken through
    the ``r x r`` Gram matrices (``||P Q||^2 = sum((P^T P) * (Q Q^T))``), never forming the
    full ``out x in`` products.
    """
    errors, norms = 0.0, 0.0
    for module_type, (a_t, b_t) in teacher.items():
        if module_type not in generated:
            continue
        a_g, b_g = generated[module_type]
        p = torch.cat([scaling * b_g, -teacher_scaling * b_t.to(b_g.dtype)], dim=-1)
        q = torch.cat([a_g, a_t.to(a_g.dtype)], dim=-2)
        gram_p = p.transpose(-1, -2) @ p
        gram_q = q @ q.transpose(-1, -2)
        errors = errors + (gram_p * gram_q).sum((-1, -2)).clamp(min=0).sum(-1)
        ref_p = (teacher_scaling * b_t).transpose(-1, -2) @ (teacher_scaling * b_t)
        ref_q = a_t @ a_t.transpose(-1, -2)
        norms = norms + (ref_p * ref_q).sum((-1, -2)).sum(-1)
    if isinstance(errors, float):
        raise ValueError("the generated and teacher adapters share no module type")
    return (errors / torch.as_tensor(norms).clamp(min=1e-12)).mean()


class HypernetRun:
    def __init__(
        self,
        hypernetwork: Hypernetwork,
        chat: LocalChatModel,
        names: list[str],
        files: dict[str, AdapterFiles],
        tasks: dict[str, Task],
        folder: Path,
        config: HypernetTrainConfig,
        run_id: str,
        *,
        init: dict[str, str] | None = None,
    ) -> None:
        self.hypernetwork = hypernetwork.to(chat.device)
        self.chat = chat
        self.names = names
        self.tasks = tasks
        self.folder = folder
        self.config = config
        self.run_id = run_id
        self.train_examples = {n: [e for e in tasks[n].examples if not e.is_test] for n in names}
        self.heldout = {
            n: [e for e in tasks[n].examples if e.is_test][: config.eval_examples_per_task]
            for n in names
        }
        device = chat.device
        hconf = hypernetwork.config
        # Teachers stacked like the hypernetwork's output: {type: (A [N, L, r, in], B [N, L, out, r])};
        # a task without a teacher gets zeros, so "the teacher" is the base model itself.
        self.teacher: Factors = {}
        self.with_teacher = [t for t, n in enumerate(names) if n in files]
        rank = next(iter(files.values())).config.r if files else hconf.r
        for module_type, paths in hconf.module_paths.items():
            a_all, b_all = [], []
            for n in names:
                if n in files:
                    pairs = [files[n].factors(p) for p in paths]
                    a_all.append(torch.stack([a for a, _ in pairs]).float())
                    b_all.append(torch.stack([b for _, b in pairs]).float())
                else:
                    fan_in, fan_out = hconf.module_shapes[module_type]
                    a_all.append(torch.zeros(len(paths), rank, fan_in))
                    b_all.append(torch.zeros(len(paths), fan_out, rank))
            self.teacher[module_type] = (
                torch.stack(a_all).to(device),
                torch.stack(b_all).to(device),
            )
        self.with_teacher_set = set(self.with_teacher)
        self.teacher_scaling = next(iter(files.values())).scaling if files else hconf.scaling
        chat.model.requires_grad_(False)
        chat.model.eval()
        self.init = init  # where a further-trained run started, for its summary
        self.injection = LoraInjection(
            chat.model, [p for ps in hconf.module_paths.values() for p in ps]
        )
        self._encoded: dict[tuple[str, int, bool], Encoded] = {}
        self.embeddings: torch.Tensor | None = None

    # ------------------------------------------------------------------------------- data

    def _encode(self, name: str, example: Example, *, definition: bool) -> Encoded:
        key = (name, example.index, definition)
        if key not in self._encoded:
            self._encoded[key] = encode_example(
                self.chat,
                input=example.input,
                answer=example.targets[0],
                definition=self.tasks[name].definition if definition else None,
                max_length=self.config.max_length,
                max_answer_tokens=self.config.max_answer_tokens,
            )
        return self._encoded[key]

    def _draw(self, step: int) -> tuple[list[tuple[int, Example]], list[bool]]:
        """(task index, example) pairs of one step, and whether each row's student reads the
        definition; fixed by the seed and the step alone."""
        config = self.config
        rng = random.Random(config.seed * 1_000_003 + step)
        chosen = rng.sample(range(len(self.names)), min(config.tasks_per_step, len(self.names)))
        rows = []
        for t in chosen:
            pool = self.train_examples[self.names[t]]
            picks = (
                rng.sample(pool, config.examples_per_task)
                if len(pool) >= config.examples_per_task
                else [rng.choice(pool) for _ in range(config.examples_per_task)]
            )
            rows += [(t, e) for e in picks]
        rate = config.student_definition_rate
        shown = [rate > 0 and rng.random() < rate for _ in rows]
        return rows, shown

    # ------------------------------------------------------------------------------ losses

    def _factors_for_rows(
        self, factors: Factors, rows: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-module ``(A [rows, r, in], B [rows, out, r])`` for the injection hooks."""
        per_module = {}
        paths = self.hypernetwork.config.module_paths
        for module_type, (a, b) in factors.items():
            a_rows, b_rows = a.index_select(0, rows), b.index_select(0, rows)
            for layer, path in enumerate(paths[module_type]):
                per_module[path] = (a_rows[:, layer], b_rows[:, layer])
        return per_module

    def _losses(
        self,
        task_ids: list[int],
        rows: list[tuple[int, Example]],
        *,
        weights_only: bool,
        shown: list[bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        config, hnet = self.config, self.hypernetwork
        assert self.embeddings is not None
        index = torch.tensor(task_ids, device=self.chat.device)
        generated = hnet(self.embeddings.index_select(0, index))
        teacher = {
            m: (a.index_select(0, index), b.index_select(0, index))
            for m, (a, b) in self.teacher.items()
        }
        losses: dict[str, torch.Tensor] = {}
        taught_rows = [i for i, t in enumerate(task_ids) if t in self.with_teacher_set]
        if taught_rows and (weights_only or config.lambda_weights > 0):
            keep = torch.tensor(taught_rows, device=self.chat.device)
            losses["weights"] = relative_weight_error(
                {
                    m: (a.index_select(0, keep), b.index_select(0, keep))
                    for m, (a, b) in generated.items()
                },
                {
                    m: (a.index_select(0, keep), b.index_select(0, keep))
                    for m, (a, b) in teacher.items()
                },
                scaling=hnet.config.scaling,
                teacher_scaling=self.teacher_scaling,
            )
        if weights_only:
            losses["loss"] = losses["weights"]
            return losses
        position = {t: i for i, t in enumerate(task_ids)}
        row_index = torch.tensor([position[t] for t, _ in rows], device=self.chat.device)
        names = [self.names[t] for t, _ in rows]
        shown = shown or [False] * len(rows)
        student_batch = [
            self._encode(n, e, definition=d)
            for n, (_, e), d in zip(names, rows, shown, strict=True)
        ]
        student = self._student(generated, row_index, student_batch)
        losses["pred"] = student.cross_entropy()
        total = losses["pred"]
        if config.lambda_kl > 0:
            teacher_batch = [
                self._encode(n, e, definition=True) for n, (_, e) in zip(names, rows, strict=True)
            ]
            with torch.no_grad():
                taught = self._teacher(teacher, row_index, teacher_batch)
            losses["kl"] = student.kl_from(taught, temperature=config.kl_temperature)
            total = total + config.lambda_kl * losses["kl"]
        if "weights" in losses:
            total = total + config.lambda_weights * losses["weights"]
        losses["loss"] = total
        return losses

    def _student(
        self, generated: Factors, rows: torch.Tensor, batch: list[Encoded]
    ) -> AnswerLogits:
        with (
            self.injection.apply(
                self._factors_for_rows(generated, rows), self.hypernetwork.config.scaling
            ),
            autocast(self.chat.device, self.config.precision),
        ):
            return answer_logits(self.chat, self.chat.model, batch)

    def _teacher(self, teacher: Factors, rows: torch.Tensor, batch: list[Encoded]) -> AnswerLogits:
        # Without any teacher LoRA (all zeros) the teacher is the bare base model: no hooks.
        injected = (
            self.injection.apply(self._factors_for_rows(teacher, rows), self.teacher_scaling)
            if self.with_teacher
            else contextlib.nullcontext()
        )
        with injected, autocast(self.chat.device, self.config.precision):
            return answer_logits(self.chat, self.chat.model, batch)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Held-out L_pred, KL and weight error on the first test examples of every train task."""
        pairs = [(t, e) for t, n in enumerate(self.names) for e in self.heldout[n]]
        if not pairs:
            return {}
        hnet = self.hypernetwork
        was_training = hnet.training
        hnet.eval()
        sums: dict[str, float] = {}
        size = self.config.tasks_per_step * self.config.examples_per_task
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            ids = sorted({t for t, _ in chunk})
            losses = self._losses(ids, chunk, weights_only=False)
            if self.config.student_definition_rate > 0:
                # The adapter is also trained to work beside the definition: measure that too.
                shown = self._losses(ids, chunk, weights_only=False, shown=[True] * len(chunk))
                losses["pred_definition"] = shown["pred"]
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.item() * len(chunk)
        hnet.train(was_training)
        metrics = {f"eval_{k}": v / len(pairs) for k, v in sums.items()}
        # The best checkpoint is picked on the answer loss the adapter is trained for: without
        # the definition, and (when students also read it) the mean of with and without.
        metrics["eval_select"] = (
            (metrics["eval_pred"] + metrics["eval_pred_definition"]) / 2
            if "eval_pred_definition" in metrics
            else metrics["eval_pred"]
        )
        return metrics

    # ------------------------------------------------------------------------------- loop

    def _keep_if_best(self, loop: Loop, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        state = loop.state
        loop.log({"step": state["step"], **metrics})
        best = state["best_eval"]
        if best is None or metrics["eval_select"] < best.get("eval_select", best["eval_pred"]):
            state["best_eval"] = {"step": state["step"], **metrics}
            self.hypernetwork.save_pretrained(self.folder / "best")

    def train(
        self, *, progress: bool, on_step: Callable[[int, dict[str, Any]], None] | None
    ) -> HypernetTrainResult:
        config, hnet, device = self.config, self.hypernetwork, self.chat.device
        params = {n: p for n, p in hnet.named_parameters() if p.requires_grad}
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
                eval_every=config.eval_every,
                weight_decay=config.weight_decay,
            ),
            run_id=self.run_id,
            device=device,
            label="hypernetwork",
            other_run="other settings or teachers; give a new out folder",
            # The config travels with the weights, so a resume rebuilds the same shape.
            extra_json={CONFIG_FILE: asdict(hnet.config)},
            state={"best_eval": None},
            progress=progress,
            on_step=on_step,
        )
        loop.start(seed=config.seed + 1)
        self.embeddings = hnet.embed(
            [self.tasks[n].definition or "" for n in self.names], warn=False
        )
        # A trained starting point is itself a candidate for "best".
        if self.init and loop.state["step"] == 0 and config.reconstruction_steps == 0:
            self._keep_if_best(loop, self._evaluate())

        def step_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
            if step < config.reconstruction_steps:
                return self._losses(self.with_teacher, [], weights_only=True)
            rows, shown = self._draw(step)
            teachers = sorted({t for t, _ in rows})
            return self._losses(teachers, rows, weights_only=False, shown=shown)

        def evaluate(state: dict[str, Any]) -> None:
            if state["step"] > config.reconstruction_steps:
                self._keep_if_best(loop, self._evaluate())

        def describe(state: dict[str, Any]) -> dict[str, str]:
            full = state["step"] > config.reconstruction_steps
            return {"phase": "full" if full else "reconstruction"}

        result = loop.run(step_fn, evaluate=evaluate, describe=describe, models=(hnet,))
        state, wall = result.state, result.wall_seconds
        if (self.folder / "best" / CONFIG_FILE).is_file():
            final = Hypernetwork.from_pretrained(self.folder / "best", device=device)
        else:
            final = hnet
        final.save_pretrained(self.folder)
        loop.finish(
            result,
            base_model=hnet.config.base_model,
            tasks=self.names,
            teachers=[self.names[t] for t in self.with_teacher],
            best_eval=state["best_eval"],
            settings=asdict(config),
            parameters=sum(p.numel() for p in hnet.parameters()),
            **({"init_from": self.init} if self.init else {}),
        )
        return HypernetTrainResult(
            out_dir=self.folder,
            steps=state["step"],
            tasks=self.names,
            best_eval=state["best_eval"],
            wall_seconds=wall,
            timing=result.timing,
        )
