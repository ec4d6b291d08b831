"""Training the hypernetwork with TAGI's objective, from the teacher LoRAs of the train tasks.

Teachers are optional, per task: a task without a teacher LoRA trains on ``L_pred`` and on the
KL from the *base model reading the definition* (distilling the instruction into the adapter,
as Text-to-LoRA's supervised mode plus context distillation), and has no ``L_weights`` term. A
run with no teachers at all needs ``reconstruction_steps=0``.

For a batch of (task, example) pairs the hypernetwork writes each task's adapter from the task's
definition, and the loss is

    L = L_pred + lambda_kl * KL(teacher || student) + lambda_weights * L_weights

- ``L_pred``: cross-entropy of the reference answer under the *student*: the base model with the
  generated adapter, reading the example's input **without** the definition;
- ``KL``: on every answer token, from the *teacher* (the base model with the task's own LoRA,
  reading the input **with** the definition) to the student's next-token distribution;
- ``L_weights``: how far the generated update ``scaling * B @ A`` is from the teacher's, per
  module and layer, as a squared Frobenius distance relative to the teacher's squared norm (0:
  identical; 1: as far as no adapter at all). Comparing products rather than ``A`` and ``B``
  makes it blind to how a rank-r update is factored, which differs between any two trainings.

An optional warm start of ``reconstruction_steps`` steps trains on ``L_weights`` alone over all
tasks: no language-model pass, so it takes seconds, and the adapters it writes already point
the teachers' way before the expensive steps begin.

Generated weights act on the frozen base model through forward hooks
(:class:`~capplug.adapters.examples.LoraInjection`), so the gradient of every term flows back
into the hypernetwork. A run folder holds ``checkpoint/`` (resumable exactly), ``best/`` (by
held-out ``L_pred``), ``train_log.jsonl``, and at the end the hypernetwork itself
(``hypernetwork.json``, ``model.safetensors``) and ``training_summary.json``.

Cost on this project's build machine (2-core AMD EPYC, shared with another job, SmolLM2-135M,
MiniLM encoder, hidden 256, batch 2 tasks x 4 examples, ``max_length=256``): a full step is
27 CPU seconds (39 s wall) in float32; bf16 autocast is slower here (35 CPU s), because the
hooks' small matrix products pay for the casts. A reconstruction step over all 44 tasks takes
about 3 s. The defaults (200 reconstruction + 800 full steps) come to about 9 hours on that
shared machine, about 4 with the two cores to itself. Without teachers (KL from the base model
reading the definition, batch 4 tasks x 2 examples, float32) a step is 15 CPU seconds, 7.9 s
wall on the two cores: the bundled hypernetwork's 500 steps took about 70 minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from capplug._cache import sha256_file, write_json_atomic
from capplug.adapters.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFiles,
    linear_shapes,
    model_identity,
    read_adapter,
)
from capplug.adapters.examples import (
    AnswerLogits,
    Encoded,
    LoraInjection,
    answer_logits,
    encode_example,
)
from capplug.adapters.hypernetwork import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Hypernetwork,
    HypernetworkConfig,
    hypernetwork_folder,
)
from capplug.data.bigbench import Example, Task
from capplug.llms.local import DEFAULT_MODEL, LocalChatModel
from capplug.training.loop import (
    SUMMARY_FILE,
    Loop,
    Precision,
    Schedule,
    autocast,
    check_float,
    check_int,
    fingerprint,
    machine,
)

__all__ = [
    "HypernetTrainConfig",
    "HypernetTrainResult",
    "find_teachers",
    "relative_weight_error",
    "train_hypernetwork",
]

logger = logging.getLogger(__name__)

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


def find_teachers(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """``{task name: adapter folder}`` of the finished teacher LoRAs under ``folder``.

    A teacher is a sub-folder with a peft adapter and the ``training_summary.json`` that
    :func:`~capplug.training.teacher_lora.train_task_lora` writes when it finishes.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"teachers folder {str(root)!r} does not exist")
    found: dict[str, Path] = {}
    unfinished = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = sub / SUMMARY_FILE
        if not (sub / ADAPTER_CONFIG).is_file() or not summary.is_file():
            if (sub / "checkpoint").is_dir():
                unfinished.append(sub.name)
            continue
        task = json.loads(summary.read_text(encoding="utf-8")).get("task")
        if isinstance(task, str) and task:
            found[task] = sub
    if unfinished:
        logger.warning(
            "capplug: %d teacher(s) under %s are not finished and are left out: %s",
            len(unfinished),
            root,
            ", ".join(unfinished[:5]),
        )
    if not found:
        raise ValueError(
            f"{root} holds no finished teacher adapters (sub-folders with {ADAPTER_CONFIG} and "
            f"{SUMMARY_FILE}); train them first with `capplug adapters train-lora --all "
            f"--out {root}`"
        )
    return found


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


def train_hypernetwork(
    teachers: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] = DEFAULT_MODEL,
    hypernetwork: Hypernetwork | None = None,
    init_from: str | os.PathLike[str] | None = None,
    encoder: str = "minilm",
    hidden_dim: int = 256,
    config: HypernetTrainConfig | None = None,
    task_names: Sequence[str] | None = None,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    tasks: Mapping[str, Task] | None = None,
    chat: LocalChatModel | None = None,
    device: str | torch.device | None = None,
    archive: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> HypernetTrainResult:
    """Train a hypernetwork against teacher LoRAs; running it again resumes where it stopped.

    Args:
        teachers: the folder :func:`~capplug.training.teacher_lora.train_all` wrote, or
            ``{task name: adapter folder}``, or ``None`` to train without teachers.
        out: the run folder; it ends up a hypernetwork folder (:meth:`Hypernetwork.from_pretrained`).
        base: the base model the teachers adapt (default: the packaged SmolLM2-135M-Instruct).
        hypernetwork: a fresh one to train; by default one is built for ``base`` with the
            teachers' rank, alpha and target modules (``r``, ``alpha`` and ``target_modules``
            when there are no teachers), ``encoder`` and ``hidden_dim``.
        init_from: start from a trained hypernetwork instead (a folder, or the bundled
            default's name) and train it further; its shape wins over ``r``, ``encoder`` and
            the rest, and its weights' hash is part of the run's settings.
        task_names: the tasks to train on (default: the teachers' tasks; with no teachers, every
            task of ``tasks``, or all Natural-Instructions train tasks). A task without a teacher
            learns from ``L_pred`` and the KL from the base model reading the definition.
        tasks: the loaded tasks by name (default: loaded from BIG-bench).
        chat: the base model already loaded; it is frozen and put in eval mode.

    A resumed run rebuilds the hypernetwork from its checkpoint, whatever ``encoder`` and
    ``hidden_dim`` say.

    Raises:
        ValueError: no teachers, teachers that disagree on rank or modules, or an ``out`` folder
            that holds a run with other settings.
        WrongBaseModelError: a teacher made for another base model.
    """
    config = config or HypernetTrainConfig()
    if teachers is None:
        teacher_folders: dict[str, Path] = {}
    elif isinstance(teachers, Mapping):
        teacher_folders = {str(k): Path(v) for k, v in teachers.items()}
        if not teacher_folders:
            raise ValueError(
                "teachers is empty; give at least one task's teacher adapter, or None to train "
                "without teachers"
            )
    else:
        teacher_folders = find_teachers(teachers)
    names = _task_list(task_names, teacher_folders, tasks)
    teacher_folders = {n: f for n, f in teacher_folders.items() if n in names}
    if not teacher_folders and config.reconstruction_steps > 0:
        raise ValueError(
            f"the reconstruction warm start ({config.reconstruction_steps} steps) learns from "
            f"teacher adapters, and none of the {len(names)} task(s) has one: set "
            f"reconstruction_steps=0 or give teachers"
        )
    if chat is None:
        chat = LocalChatModel.from_pretrained(base, device=device, dtype="float32")
        base_ref = os.fspath(base)
    else:
        base_ref = chat.name
    identity = model_identity(base_ref, chat.model.config)
    shapes = linear_shapes(chat.model)
    files = {
        n: read_adapter(teacher_folders[n], identity=identity, shapes=shapes)
        for n in sorted(teacher_folders)
    }
    _check_teachers_agree(list(files), list(files.values()))
    loaded = _load_tasks(names, tasks, archive)
    folder = Path(out).expanduser().resolve()
    checkpoint = folder / "checkpoint"
    init: dict[str, str] | None = None
    if init_from is not None:
        if hypernetwork is not None:
            raise ValueError("give either hypernetwork or init_from, not both")
        init_weights = hypernetwork_folder(init_from) / WEIGHTS_FILE
        init = {"from": os.fspath(init_from), "sha256": sha256_file(init_weights)}
    if (checkpoint / CONFIG_FILE).is_file():
        raw = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        hypernetwork = Hypernetwork(HypernetworkConfig(**raw))
    elif init_from is not None:
        hypernetwork = Hypernetwork.from_pretrained(init_from, device="cpu")
    elif hypernetwork is None:
        if files:
            first = next(iter(files.values()))
            r, alpha = first.config.r, int(first.config.lora_alpha)
            target_modules = sorted({m.rsplit(".", 1)[-1] for m in first.modules})
        hypernetwork = Hypernetwork.from_base(
            base_ref,
            encoder=encoder,
            r=r,
            alpha=alpha,
            target_modules=list(target_modules),
            hidden_dim=hidden_dim,
            seed=config.seed,
        )
    if hypernetwork.config.base_model.casefold() != identity.name.casefold():
        raise ValueError(
            f"the hypernetwork writes adapters for {hypernetwork.config.base_model}, but the "
            f"teachers and the loaded base model are {identity.name}"
        )
    run_id = fingerprint(
        {
            "tasks": names,
            "teachers": {n: sha256_file(f.folder / ADAPTER_WEIGHTS) for n, f in files.items()},
            "base": identity.name,
            "hypernetwork": asdict(hypernetwork.config),
            "settings": config.run_settings(),
            **({"init": init["sha256"]} if init else {}),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    summary_path = folder / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("run_id") == run_id:
            return HypernetTrainResult(
                out_dir=folder,
                steps=summary["steps"],
                tasks=summary["tasks"],
                best_eval=summary.get("best_eval"),
                wall_seconds=summary["wall_seconds"],
                timing=summary.get("timing", {}),
            )
        raise ValueError(
            f"{folder} holds a hypernetwork trained with other settings or teachers; give a new "
            f"out folder"
        )
    run = _Run(hypernetwork, chat, names, files, loaded, folder, config, run_id, init=init)
    try:
        return run.train(progress=progress, on_step=on_step)
    finally:
        run.injection.remove()


def _task_list(
    given: Sequence[str] | None,
    teachers: Mapping[str, Path],
    tasks: Mapping[str, Task] | None,
) -> list[str]:
    if given is not None:
        if isinstance(given, str):
            raise TypeError("task_names must be a list of task names, not one string")
        names = sorted(set(given))
        if not names:
            raise ValueError("task_names is empty; leave it out to train on every train task")
        return names
    if teachers:
        return sorted(teachers)
    if tasks is not None:
        return sorted(tasks)
    from capplug.training.teacher_lora import train_task_names

    return sorted(train_task_names())


def _check_teachers_agree(names: list[str], files: list[AdapterFiles]) -> None:
    if not files:
        return
    first = files[0]
    want = (first.config.r, first.config.lora_alpha, sorted(first.modules))
    for name, adapter in zip(names, files, strict=True):
        got = (adapter.config.r, adapter.config.lora_alpha, sorted(adapter.modules))
        if got != want:
            raise ValueError(
                f"teacher of {name} has r={got[0]}, alpha={got[1]} on {len(got[2])} modules, but "
                f"the teacher of {names[0]} has r={want[0]}, alpha={want[1]} on {len(want[2])}: "
                f"train all teachers with the same settings"
            )


def _load_tasks(
    names: list[str], given: Mapping[str, Task] | None, archive: str | os.PathLike[str] | None
) -> dict[str, Task]:
    from capplug.data.bigbench import load_task
    from capplug.training.teacher_lora import check_train_task

    loaded: dict[str, Task] = {}
    for name in names:
        check_train_task(name)
        task = given[name] if given is not None and name in given else None
        loaded[name] = task if task is not None else load_task(name, archive=archive)
        if not (loaded[name].definition or "").strip():
            raise ValueError(f"task {name!r} has no definition to write an adapter from")
        if not any(not e.is_test for e in loaded[name].examples):
            raise ValueError(f"task {name!r} has no train examples")
    return loaded


class _Run:
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
        optimizer = torch.optim.AdamW(
            list(params.values()), lr=config.lr, weight_decay=config.weight_decay
        )
        loop = Loop(
            self.folder,
            params,
            optimizer,
            Schedule(
                steps=config.steps,
                lr=config.lr,
                warmup_steps=config.warmup_steps,
                max_grad_norm=config.max_grad_norm,
                log_every=config.log_every,
                checkpoint_every=config.checkpoint_every,
                eval_every=config.eval_every,
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
        summary = {
            "run_id": self.run_id,
            "base_model": hnet.config.base_model,
            "tasks": self.names,
            "teachers": [self.names[t] for t in self.with_teacher],
            "steps": state["step"],
            "best_eval": state["best_eval"],
            "wall_seconds": round(wall, 1),
            "timing": result.timing,
            "machine": machine(device),
            "settings": asdict(config),
            "parameters": sum(p.numel() for p in hnet.parameters()),
            **({"init_from": self.init} if self.init else {}),
        }
        write_json_atomic(self.folder / SUMMARY_FILE, summary)
        loop.finish()
        return HypernetTrainResult(
            out_dir=self.folder,
            steps=state["step"],
            tasks=self.names,
            best_eval=state["best_eval"],
            wall_seconds=wall,
            timing=result.timing,
        )
