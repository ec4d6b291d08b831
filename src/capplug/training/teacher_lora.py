"""Teacher adapters: one peft LoRA per Natural-Instructions ``train`` task.

:func:`train_task_lora` trains a LoRA (default r=8, alpha=16 on ``q_proj`` and ``v_proj``) on one
task's train examples (the ``example_split`` rule: ``not example.is_test``). The model reads the
task's definition and the example's input as one chat turn and learns the reference answer: the
loss is taken on the answer tokens (and the end-of-turn token) only. These adapters are the
teachers of the hypernetwork (:mod:`capplug.training.hypernetwork`) and the per-task ceiling
of the instruction-to-adapter benchmark.

A run writes into its folder ``out``:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a standard peft folder, written
  when training ends (``PeftModel.from_pretrained(base, out)`` loads it);
- ``training_summary.json``: task, settings, held-out loss before and after, timing; its presence
  marks the adapter finished;
- ``train_log.jsonl``: one JSON object per logged step;
- ``checkpoint/`` while training: LoRA weights, optimizer, step and RNG, every
  ``checkpoint_every`` steps. Running the same call again resumes exactly where it stopped (the
  same final weights as an uninterrupted run); it is removed once the adapter is written.

:func:`train_all` does this for all 44 train tasks, one sub-folder each, skipping finished ones.

:func:`train_multitask_lora` trains one LoRA on the train examples of all 44 train tasks mixed
(each example with its own task's definition), the multi-task baseline of the benchmark; it
resumes the same way. Each task contributes an equal share of the ``steps * batch_size``
examples seen (a seeded sample of its train examples, or all of them when it has fewer), so the
big tasks do not drown the small ones. The default is 16 steps per task: 704 steps for all 44.

Dev tasks are kept for measurement, so :func:`train_task_lora` refuses them. The one exception
is the per-task ceiling of ``benchmarks/instruction_to_adapter.py``, which needs a LoRA trained
on a dev task's own *train* examples: ``purpose="benchmark-ceiling"`` permits exactly that, for
the tasks of ``dev.instruction_to_adapter`` only. Such a run trains on the examples the
``example_split`` rule puts in the train part, and reads none of the test examples, not even to
measure a held-out loss (which it leaves out).

Cost per optimizer step, SmolLM2-135M-Instruct, ``max_length=256``, batch 4, measured on this
project's build machine (2-core AMD EPYC with AVX-512 BF16, torch 2.13 CPU, 2 threads, sharing
the CPU with another job at a load average of 5-6; CPU seconds count both threads):

============================  =====================  =====================
batch                         ``precision="fp32"``   ``precision="bf16"``
============================  =====================  =====================
4 x 170 tokens (mctaco)       11.7 CPU s, 18 s wall  11.6 CPU s, 20 s wall
4 x 256 tokens (winogrande)   21.2 CPU s, 38 s wall  12.4 CPU s, 19 s wall
============================  =====================  =====================

So the default 64 steps take 20-40 minutes per task on that shared machine, and all 44 train
tasks about 15 hours with ``bf16`` (about 6 hours with the two cores to itself).
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
from capplug.data.bigbench import Example, Task
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
    "LoraTrainConfig",
    "LoraTrainResult",
    "multitask_config",
    "task_folder_name",
    "train_all",
    "train_multitask_lora",
    "train_task_lora",
    "train_task_names",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE = DEFAULT_MODEL
_NI = "natural_instructions/"
_INDEX = "teachers.json"

Purpose = Literal["teacher", "benchmark-ceiling"]
BENCHMARK_CEILING: Purpose = "benchmark-ceiling"
"""``train_task_lora(..., purpose=BENCHMARK_CEILING)``: a dev task's train examples, for the ceiling."""
MULTITASK = "multitask"
"""The ``task`` a multi-task LoRA reports (its summary lists the tasks themselves)."""
MULTITASK_STEPS_PER_TASK = 16
"""Default steps of a multi-task run per task mixed in (704 for all 44 train tasks)."""


def train_task_names() -> list[str]:
    """The Natural-Instructions tasks of the ``train`` split (44), the only ones teachers learn."""
    from capplug.data.bigbench import task_names

    return [n for n in task_names("train") if n.startswith(_NI)]


def task_folder_name(task: str) -> str:
    """The sub-folder :func:`train_all` gives a task: its name below ``natural_instructions/``."""
    return task.removeprefix(_NI).replace("/", "__")


def check_train_task(name: str) -> None:
    """A clear error unless ``name`` is a Natural-Instructions task of the train split."""
    from capplug.data.bigbench import task_names

    if name in train_task_names():
        return
    if name in task_names("dev"):
        raise ValueError(
            f"task {name!r} is a dev task, kept for measurement: teacher adapters are trained on "
            f"Natural-Instructions train tasks only (see capplug.training.teacher_lora.train_task_names())"
        )
    raise ValueError(
        f"task {name!r} is not a Natural-Instructions train task; teacher adapters are trained on "
        f"the 44 listed by capplug.training.teacher_lora.train_task_names(), e.g. "
        f"{train_task_names()[0]!r}"
    )


def _check_task(name: str, purpose: Purpose) -> None:
    """Refuse a task the ``purpose`` does not allow (before any model is loaded)."""
    if purpose == "teacher":
        check_train_task(name)
        return
    if purpose != BENCHMARK_CEILING:
        raise ValueError(f"purpose must be 'teacher' or {BENCHMARK_CEILING!r}; got {purpose!r}")
    from capplug.data.bigbench import task_names

    allowed = task_names("dev", "instruction_to_adapter")
    if name not in allowed:
        raise ValueError(
            f"purpose={BENCHMARK_CEILING!r} trains the per-task ceiling of the "
            f"instruction-to-adapter benchmark on a task of dev.instruction_to_adapter only "
            f"(e.g. {allowed[0]!r}); {name!r} is not one"
        )


def _resolve_task(
    task: str | Task, archive: str | os.PathLike[str] | None, purpose: Purpose = "teacher"
) -> Task:
    if isinstance(task, Task):
        _check_task(task.name, purpose)
        loaded = task
    elif isinstance(task, str):
        _check_task(task, purpose)
        from capplug.data.bigbench import load_task

        loaded = load_task(task, archive=archive)
    else:
        raise TypeError(f"task must be a task name or a Task; got {type(task).__name__}")
    if not (loaded.definition or "").strip():
        raise ValueError(f"task {loaded.name!r} has no definition to put in the prompt")
    return loaded


def _train_part(task: Task) -> list[Example]:
    """The task's train examples by the ``example_split`` rule, judged under the task's own name."""
    from capplug.data.bigbench import is_test_example

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
    archive: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    purpose: Purpose = "teacher",
) -> LoraTrainResult:
    """Train a teacher LoRA on one Natural-Instructions ``train`` task; resumable.

    Args:
        task: a train task's name (``natural_instructions/subtask...``) or its loaded ``Task``.
        out: the run folder; it ends up a standard peft adapter folder.
        base: the model to adapt (default: the packaged SmolLM2-135M-Instruct).
        r, alpha, target_modules, steps, batch_size, lr, max_length: override ``config``.
        config: every setting (:class:`LoraTrainConfig`); the keywords above win over it.
        resume: continue from ``out/checkpoint`` when there is one; ``False`` starts over.
        chat: an already loaded base model to reuse (as :func:`train_all` does); it gets the
            adapter layers only while training.
        device: where to train when ``chat`` is not given (default: the GPU if there is one).
        archive: a bigbench-1.0.0 sdist you already have (else fetched into the cache).
        progress: show a progress bar.
        on_step: called after every optimizer step with the step and its log entry.
        purpose: ``"teacher"`` (default): Natural-Instructions train tasks only.
            ``"benchmark-ceiling"`` (:data:`BENCHMARK_CEILING`) is for
            ``benchmarks/instruction_to_adapter.py`` alone: it accepts a task of
            ``dev.instruction_to_adapter`` (and no other task, train tasks included) and trains
            on that task's train examples by the ``example_split`` rule. None of its test
            examples is read, not even for the held-out loss, which such a run leaves out.

    Raises:
        ValueError: a task the ``purpose`` does not allow, bad settings, or an ``out`` folder
            that holds an adapter trained with other settings.
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
    loaded_task = _resolve_task(task, archive, purpose)
    definition = loaded_task.definition or ""
    examples = [(definition, e) for e in _train_part(loaded_task)]
    if not examples:
        raise ValueError(f"task {loaded_task.name!r} has no train examples")
    if purpose == BENCHMARK_CEILING:
        heldout: list[tuple[str, Example]] = []  # a dev task's test part is the benchmark's
    else:
        test = [e for e in loaded_task.examples if e.is_test]
        heldout = [(definition, e) for e in test[: config.eval_examples]]
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
    archive: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> LoraTrainResult:
    """Train one LoRA on the mixed train examples of many Natural-Instructions train tasks.

    Every example is read with its own task's definition, as a teacher reads it. Each task
    contributes ``ceil(steps * batch_size / len(tasks))`` train examples (a sample fixed by the
    seed; all of them when it has fewer), pooled and shuffled epoch by epoch as in
    :func:`train_task_lora`, whose training loop, checkpoints and exact resume this shares.
    The held-out loss is measured on the first test examples of the tasks, spread over them.

    Args:
        out: the run folder; it ends up a standard peft adapter folder.
        tasks: train task names or loaded ``Task`` objects (default: all 44 train tasks).
        steps: optimizer steps (default: :data:`MULTITASK_STEPS_PER_TASK` per task, unless
            ``config`` sets other than the per-task default of 64).
        config, resume, chat, device, archive, progress, on_step: as for
            :func:`train_task_lora`.

    Raises:
        ValueError: a task outside the Natural-Instructions train split, a task given twice,
            bad settings, or an ``out`` folder holding an adapter trained otherwise.
    """
    given = list(tasks) if tasks is not None else train_task_names()
    if not given:
        raise ValueError("tasks is empty; leave it out to mix all 44 train tasks")
    for task in given:  # every name is checked before anything is loaded
        if isinstance(task, str):
            check_train_task(task)
    loaded = [_resolve_task(task, archive) for task in given]
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
        examples += [(task.definition or "", e) for e in train]
    per_eval = math.ceil(config.eval_examples / len(loaded))
    heldout = [
        (task.definition or "", e)
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
    archive: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[LoraTrainResult]:
    """Train a teacher LoRA for every Natural-Instructions train task into ``out/<task>/``.

    Finished adapters are skipped and an interrupted one resumes, so running the same call
    again after a stop continues the job. ``out/teachers.json`` lists the tasks and folders.

    Args:
        tasks: a subset of :func:`train_task_names` (default: all 44).
    """
    names = list(tasks) if tasks is not None else train_task_names()
    if not names:
        raise ValueError("tasks is empty; leave it out to train all 44 train tasks")
    for name in names:
        check_train_task(name)
    config = config or LoraTrainConfig()
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    chat = LocalChatModel.from_pretrained(base, device=device, dtype="float32")
    identity = model_identity(base, chat.model.config)
    results: list[LoraTrainResult] = []
    for position, name in enumerate(names, start=1):
        logger.warning("capplug: teacher %d/%d: %s", position, len(names), name)
        result = train_task_lora(
            name,
            root / task_folder_name(name),
            config=config,
            chat=chat,
            archive=archive,
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
