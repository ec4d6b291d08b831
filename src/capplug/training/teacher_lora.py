"""Teacher adapters: one peft LoRA per ``train`` task of the pool that has an instruction.

:func:`train_task_lora` trains a LoRA (default r=8, alpha=16 on ``q_proj`` and ``v_proj``) on one
task's train examples (the ``example_split`` rule: ``not example.is_test``). The model reads the
task's instruction (its definition) and the example's input as one chat turn and learns the
reference answer: the loss is taken on the answer tokens (and the end-of-turn token) only. These
adapters are the teachers of the hypernetwork (:mod:`capplug.training.hypernetwork`) and the
per-task ceiling of the instruction-to-adapter benchmark.

Tasks come from the pool (:func:`capplug.data.open_pool`: ``data=``, ``$CAPPLUG_DATA``, or
``../shared/data`` beside a source checkout) by name, e.g.
``natural_instructions_v1/subtask003_mctaco_question_generation_event_duration`` (a name without
its source is enough when only one task has it), or as loaded :class:`~capplug.data.Task` objects.
Any ``train`` task with an instruction can have a teacher; by default (:func:`train_task_names`)
:func:`train_all` and :func:`train_multitask_lora` take the pool's Natural Instructions (v1)
train tasks, 38 in the shared data.

A run writes into its folder ``out``:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a standard peft folder, written
  when training ends (``PeftModel.from_pretrained(base, out)`` loads it);
- ``training_summary.json``: task, settings, held-out loss before and after, timing; its presence
  marks the adapter finished;
- ``train_log.jsonl``: one JSON object per logged step;
- ``checkpoint/`` while training: LoRA weights, optimizer, step and RNG, every
  ``checkpoint_every`` steps. Running the same call again resumes exactly where it stopped (the
  same final weights as an uninterrupted run); it is removed once the adapter is written.

:func:`train_all` does this for every default task (or the ones named), one sub-folder each
(:func:`task_folder_name`), skipping finished ones.

:func:`train_multitask_lora` trains one LoRA on the train examples of many train tasks mixed
(each example with its own task's instruction), the multi-task baseline of the benchmark; it
resumes the same way. Each task contributes an equal share of the ``steps * batch_size``
examples seen (a seeded sample of its train examples, or all of them when it has fewer), so the
big tasks do not drown the small ones. The default is 16 steps per task: 608 steps for the 38
default tasks of the shared data.

Dev tasks are kept for measurement, so :func:`train_task_lora` refuses them. The one exception
is the per-task ceiling of ``benchmarks/instruction_to_adapter.py``, which needs a LoRA trained
on a dev task's own *train* examples: ``purpose="benchmark-ceiling"`` permits exactly that, for
the pool's ``instruction_to_adapter`` dev tasks only (``capplug.data.task_names("dev",
"instruction_to_adapter")``). Such a run trains on the examples the ``example_split`` rule puts
in the train part, and reads none of the test examples, not even to measure a held-out loss
(which it leaves out).

Cost per optimizer step, SmolLM2-135M-Instruct, ``max_length=256``, batch 4, measured on this
project's build machine (2-core AMD EPYC with AVX-512 BF16, torch 2.13 CPU, 2 threads, sharing
the CPU with another job at a load average of 5-6; CPU seconds count both threads):

============================  =====================  =====================
batch                         ``precision="fp32"``   ``precision="bf16"``
============================  =====================  =====================
4 x 170 tokens (mctaco)       11.7 CPU s, 18 s wall  11.6 CPU s, 20 s wall
4 x 256 tokens (winogrande)   21.2 CPU s, 38 s wall  12.4 CPU s, 19 s wall
============================  =====================  =====================

So the default 64 steps take 20-40 minutes per task on that shared machine, and 44 tasks about
15 hours with ``bf16`` (about 6 hours with the two cores to itself).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from capplug._cache import write_json_atomic
from capplug.data import Example, Pool, Task, is_test_example, open_pool, task_names
from capplug.llms.local import DEFAULT_MODEL, LocalChatModel
from capplug.models.adapter_folder import (
    BaseModelIdentity,
    model_identity,
)
from capplug.training.loop import (
    check_int,
    fingerprint,
)
from capplug.training.lora_run import (
    LoraRun,
    LoraTrainConfig,
    LoraTrainResult,
)

__all__ = [
    "BENCHMARK_CEILING",
    "DEFAULT_BASE",
    "MULTITASK",
    "TEACHER_SOURCE",
    "LoraTrainConfig",
    "LoraTrainResult",
    "check_train_task",
    "multitask_config",
    "task_folder_name",
    "train_all",
    "train_multitask_lora",
    "train_task_lora",
    "train_task_names",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE = DEFAULT_MODEL
_INDEX = "teachers.json"

DataRef = str | os.PathLike[str] | Pool | None
"""Where tasks named by a string are read from: a folder, task file or BIG-bench sdist, an
opened :class:`~capplug.data.Pool`, or ``None`` for the default pool (see
:func:`capplug.data.open_pool`)."""

TEACHER_SOURCE = "natural_instructions_v1"
"""The source whose train tasks get a teacher by default (:func:`train_task_names`)."""

Purpose = Literal["teacher", "benchmark-ceiling"]
BENCHMARK_CEILING: Purpose = "benchmark-ceiling"
"""``train_task_lora(..., purpose=BENCHMARK_CEILING)``: a dev task's train examples, for the ceiling."""
MULTITASK = "multitask"
"""The ``task`` a multi-task LoRA reports (its summary lists the tasks themselves)."""
MULTITASK_STEPS_PER_TASK = 16
"""Default steps of a multi-task run per task mixed in (608 for the 38 default tasks)."""


def train_task_names(data: DataRef = None) -> list[str]:
    """The pool's Natural Instructions (v1) ``train`` tasks, sorted: the tasks :func:`train_all`
    and :func:`train_multitask_lora` train by default (38 in the shared data).

    Raises:
        NoDataError: no task data at ``data`` (or in the default places).
    """
    return open_pool(data).names("train", source=TEACHER_SOURCE)


def _default_tasks(pool: Pool) -> list[str]:
    names = train_task_names(pool)
    if not names:
        raise ValueError(
            f"the pool at {pool.root} holds no {TEACHER_SOURCE} train tasks to train by default; "
            f"name the tasks to train"
        )
    return names


def task_folder_name(task: str) -> str:
    """The sub-folder :func:`train_all` gives a task: its name with ``/`` written ``__``."""
    return task.replace("/", "__")


def check_train_task(name: str, *, data: DataRef = None) -> str:
    """The pool's name for ``name`` (see :meth:`~capplug.data.Pool.resolve`) when it is one of its
    ``train`` tasks; a clear error otherwise. Nothing is read beyond the pool's listing.

    Raises:
        ValueError: no such task in the pool, several match, or it is a dev task.
        NoDataError: no task data at ``data`` (or in the default places).
    """
    pool = open_pool(data)
    resolved = pool.resolve(name)
    _check_task(resolved, pool.entry(resolved).split, "teacher", pool)
    return resolved


def _check_task(name: str, split: str, purpose: Purpose, data: DataRef) -> None:
    """Refuse a task the ``purpose`` does not allow (before any model is loaded)."""
    if purpose == "teacher":
        if split != "train":
            raise ValueError(
                f"task {name!r} is a dev task, kept for measurement: teacher adapters are "
                f"trained on the pool's train tasks only (e.g. those of "
                f"capplug.training.teacher_lora.train_task_names())"
            )
        return
    if purpose != BENCHMARK_CEILING:
        raise ValueError(f"purpose must be 'teacher' or {BENCHMARK_CEILING!r}; got {purpose!r}")
    allowed = task_names("dev", "instruction_to_adapter", data=data)
    if name not in allowed:
        example = f" (e.g. {allowed[0]!r})" if allowed else ""
        raise ValueError(
            f"purpose={BENCHMARK_CEILING!r} trains the per-task ceiling of the "
            f"instruction-to-adapter benchmark, on a task of its dev list only{example}; "
            f"{name!r} is not one"
        )


def _resolve_task(task: str | Task, data: DataRef, purpose: Purpose = "teacher") -> Task:
    """The task, loaded from the pool when named, once the ``purpose`` allows it."""
    if isinstance(task, Task):
        _check_task(task.name, task.split, purpose, data)
        loaded = task
    elif isinstance(task, str):
        pool = open_pool(data)
        name = pool.resolve(task)
        _check_task(name, pool.entry(name).split, purpose, pool)
        loaded = pool.load(name)
    else:
        raise TypeError(f"task must be a task name or a Task; got {type(task).__name__}")
    if not loaded.instruction.strip():
        raise ValueError(f"task {loaded.name!r} has no instruction to put in the prompt")
    return loaded


def _train_part(task: Task) -> list[Example]:
    """The task's train examples by the ``example_split`` rule, judged under the task's own name."""
    return [e for e in task.examples if not e.is_test and not is_test_example(task.name, e.input)]


def config_with(config: LoraTrainConfig | None, **overrides: Any) -> LoraTrainConfig:
    """``config`` (default: the defaults) with the ``overrides`` that are not ``None``."""
    config = config or LoraTrainConfig()
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(config, **given) if given else config


def multitask_config(
    tasks: int, config: LoraTrainConfig | None = None, **overrides: Any
) -> LoraTrainConfig:
    """The settings of a multi-task run over ``tasks`` tasks: ``config`` and ``overrides``, with
    :data:`MULTITASK_STEPS_PER_TASK` steps per task unless ``steps`` is given (in either)."""
    check_int(tasks, "tasks")
    if overrides.get("steps") is None and (config is None or config.steps == LoraTrainConfig.steps):
        overrides["steps"] = MULTITASK_STEPS_PER_TASK * tasks
    return config_with(config, **overrides)


def _base_model(
    chat: LocalChatModel | None, base: str | os.PathLike[str], device: str | torch.device | None
) -> tuple[LocalChatModel, BaseModelIdentity]:
    if chat is None:
        chat = LocalChatModel.from_pretrained(base, device=device, dtype="float32")
        return chat, model_identity(base, chat.model.config)
    return chat, model_identity(chat.name, chat.model.config)


def train_task_lora(
    task: str | Task,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] = DEFAULT_BASE,
    r: int | None = None,
    alpha: int | None = None,
    target_modules: Sequence[str] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_length: int | None = None,
    config: LoraTrainConfig | None = None,
    resume: bool = True,
    chat: LocalChatModel | None = None,
    device: str | torch.device | None = None,
    data: DataRef = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    purpose: Purpose = "teacher",
) -> LoraTrainResult:
    """Train a teacher LoRA on one ``train`` task of the pool that has an instruction; resumable.

    Args:
        task: a train task's name in the pool (e.g. ``natural_instructions_v1/subtask003_...``)
            or a loaded ``Task`` (its ``split`` must be ``train``).
        out: the run folder; it ends up a standard peft adapter folder.
        base: the model to adapt (default: the packaged SmolLM2-135M-Instruct).
        r, alpha, target_modules, steps, batch_size, lr, max_length: override ``config``.
        config: every setting (:class:`LoraTrainConfig`); the keywords above win over it.
        resume: continue from ``out/checkpoint`` when there is one; ``False`` starts over.
        chat: an already loaded base model to reuse (as :func:`train_all` does); it gets the
            adapter layers only while training.
        device: where to train when ``chat`` is not given (default: the GPU if there is one).
        data: the task data a task name is read from (see :data:`DataRef`; default: the
            default pool).
        progress: show a progress bar.
        on_step: called after every optimizer step with the step and its log entry.
        purpose: ``"teacher"`` (default): train tasks only. ``"benchmark-ceiling"``
            (:data:`BENCHMARK_CEILING`) is for ``benchmarks/instruction_to_adapter.py`` alone: it
            accepts a dev task of the pool's ``instruction_to_adapter`` list (and no other task,
            train tasks included) and trains on that task's train examples by the
            ``example_split`` rule. None of its test examples is read, not even for the held-out
            loss, which such a run leaves out.

    Raises:
        ValueError: a task the ``purpose`` does not allow, one not in the pool or without an
            instruction, bad settings, or an ``out`` folder that holds an adapter trained with
            other settings.
        NoDataError: a task name, and no task data at ``data`` (or in the default places).
        DataError: the task's file is unreadable or malformed.
    """
    config = config_with(
        config,
        r=r,
        alpha=alpha,
        target_modules=tuple(target_modules) if target_modules is not None else None,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        max_length=max_length,
    )
    loaded_task = _resolve_task(task, data, purpose)
    instruction = loaded_task.instruction
    examples = [(instruction, e) for e in _train_part(loaded_task)]
    if not examples:
        raise ValueError(f"task {loaded_task.name!r} has no train examples")
    if purpose == BENCHMARK_CEILING:
        heldout: list[tuple[str, Example]] = []  # a dev task's test part is the benchmark's
    else:
        test = [e for e in loaded_task.examples if e.is_test]
        heldout = [(instruction, e) for e in test[: config.eval_examples]]
    folder = Path(out).expanduser().resolve()
    chat, identity = _base_model(chat, base, device)
    identity_parts = {
        "task": loaded_task.name,
        "train_examples": len(examples),
        "base": identity.name,
        "settings": config.run_settings(),
    }
    if purpose != "teacher":
        identity_parts["purpose"] = purpose  # teachers keep the fingerprint they always had
    metadata = {"capplug_task": loaded_task.name}
    extra: dict[str, Any] = {}
    if purpose != "teacher":
        metadata["capplug_purpose"] = purpose
        extra["purpose"] = purpose
    run = LoraRun(
        loaded_task.name,
        examples,
        heldout,
        folder,
        chat,
        identity,
        config,
        fingerprint(identity_parts),
        metadata=metadata,
        summary=extra,
        bar_label=_short(loaded_task.name),
    )
    return run.launch(resume=resume, progress=progress, on_step=on_step)


def train_multitask_lora(
    out: str | os.PathLike[str],
    *,
    tasks: Sequence[str | Task] | None = None,
    base: str | os.PathLike[str] = DEFAULT_BASE,
    steps: int | None = None,
    config: LoraTrainConfig | None = None,
    resume: bool = True,
    chat: LocalChatModel | None = None,
    device: str | torch.device | None = None,
    data: DataRef = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> LoraTrainResult:
    """Train one LoRA on the mixed train examples of many train tasks.

    Every example is read with its own task's instruction, as a teacher reads it. Each task
    contributes ``ceil(steps * batch_size / len(tasks))`` train examples (a sample fixed by the
    seed; all of them when it has fewer), pooled and shuffled epoch by epoch as in
    :func:`train_task_lora`, whose training loop, checkpoints and exact resume this shares.
    The held-out loss is measured on the first test examples of the tasks, spread over them.

    Args:
        out: the run folder; it ends up a standard peft adapter folder.
        tasks: train task names or loaded ``Task`` objects (default:
            :func:`train_task_names`, the pool's Natural Instructions train tasks).
        steps: optimizer steps (default: :data:`MULTITASK_STEPS_PER_TASK` per task, unless
            ``config`` sets other than the per-task default of 64).
        config, resume, chat, device, data, progress, on_step: as for
            :func:`train_task_lora`.

    Raises:
        ValueError: a task outside the pool's train split or without an instruction, a task
            given twice, bad settings, or an ``out`` folder holding an adapter trained otherwise.
    """
    given = list(tasks) if tasks is not None else _default_tasks(open_pool(data))
    if not given:
        raise ValueError("tasks is empty; leave it out to mix the default train tasks")
    for task in given:  # every name is checked before anything is loaded
        if isinstance(task, str):
            check_train_task(task, data=data)
    loaded = [_resolve_task(task, data) for task in given]
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise ValueError(
            f"tasks holds a task twice: {sorted({n for n in names if names.count(n) > 1})}"
        )
    config = multitask_config(len(loaded), config, steps=steps)
    share = math.ceil(config.steps * config.batch_size / len(loaded))
    examples: list[tuple[str, Example]] = []
    per_task: dict[str, int] = {}
    for task in loaded:
        train = _train_part(task)
        if not train:
            raise ValueError(f"task {task.name!r} has no train examples")
        if len(train) > share:
            keep = sorted(
                random.Random(f"{config.seed}:{task.name}").sample(range(len(train)), share)
            )
            train = [train[i] for i in keep]
        per_task[task.name] = len(train)
        examples += [(task.instruction, e) for e in train]
    per_eval = math.ceil(config.eval_examples / len(loaded))
    heldout = [
        (task.instruction, e)
        for task in loaded
        for e in [e for e in task.examples if e.is_test][:per_eval]
    ][: config.eval_examples]
    folder = Path(out).expanduser().resolve()
    chat, identity = _base_model(chat, base, device)
    run_id = fingerprint(
        {
            "task": MULTITASK,
            "train_examples": per_task,
            "base": identity.name,
            "settings": config.run_settings(),
        }
    )
    run = LoraRun(
        MULTITASK,
        examples,
        heldout,
        folder,
        chat,
        identity,
        config,
        run_id,
        metadata={"capplug_task": MULTITASK, "capplug_tasks": ",".join(names)},
        summary={"tasks": per_task},
        bar_label=_short(MULTITASK),
    )
    return run.launch(resume=resume, progress=progress, on_step=on_step)


def train_all(
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] = DEFAULT_BASE,
    tasks: Sequence[str] | None = None,
    config: LoraTrainConfig | None = None,
    device: str | torch.device | None = None,
    data: DataRef = None,
    progress: bool = True,
) -> list[LoraTrainResult]:
    """Train a teacher LoRA for each task into ``out/<task>/`` (:func:`task_folder_name`).

    Finished adapters are skipped and an interrupted one resumes, so running the same call
    again after a stop continues the job. ``out/teachers.json`` lists the tasks and folders.

    Args:
        tasks: train task names of the pool (default: :func:`train_task_names`, its Natural
            Instructions train tasks).
        data: the task data (see :data:`DataRef`; default: the default pool).

    Raises:
        ValueError: a task outside the pool's train split or without an instruction.
    """
    pool = open_pool(data)
    given = list(tasks) if tasks is not None else _default_tasks(pool)
    if not given:
        raise ValueError("tasks is empty; leave it out to train the default train tasks")
    names = [check_train_task(name, data=pool) for name in given]
    loaded = [_resolve_task(name, pool) for name in names]  # each one readable, before training
    config = config or LoraTrainConfig()
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    chat = LocalChatModel.from_pretrained(base, device=device, dtype="float32")
    identity = model_identity(base, chat.model.config)
    results: list[LoraTrainResult] = []
    for position, task in enumerate(loaded, start=1):
        logger.warning("capplug: teacher %d/%d: %s", position, len(loaded), task.name)
        result = train_task_lora(
            task,
            root / task_folder_name(task.name),
            config=config,
            chat=chat,
            progress=progress,
        )
        results.append(result)
        write_json_atomic(
            root / _INDEX,
            {
                "base_model": identity.name,
                "settings": config.run_settings(),
                "teachers": {r.task: r.out_dir.name for r in results},
            },
        )
    return results


def _short(task: str) -> str:
    name = task_folder_name(task)
    return name if len(name) <= 40 else name[:37] + "..."
