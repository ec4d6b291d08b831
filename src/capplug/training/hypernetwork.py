"""Training the hypernetwork with TAGI's objective, from the teacher LoRAs of the train tasks.

The hypernetwork learns from ``train`` tasks of the pool (:func:`capplug.data.open_pool`) that
have an instruction and train examples: by default the teachers' tasks, or without teachers
every such task of the pool (672 in the shared data: BIG-bench, Natural Instructions, P3,
instruction induction). Dev tasks are refused.

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
hooks' small matrix products pay for the casts. A reconstruction step over 44 tasks takes
about 3 s. The defaults (200 reconstruction + 800 full steps) come to about 9 hours on that
shared machine, about 4 with the two cores to itself. Without teachers (KL from the base model
reading the definition, batch 4 tasks x 2 examples, float32) a step is 15 CPU seconds, 7.9 s
wall on the two cores: the bundled hypernetwork's 500 steps took about 70 minutes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capplug._cache import sha256_file
from capplug.adapters.hypernetwork import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Hypernetwork,
    HypernetworkConfig,
    hypernetwork_folder,
)
from capplug.data import Pool, Task, open_pool
from capplug.llms.local import DEFAULT_MODEL, LocalChatModel
from capplug.models.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFiles,
    linear_shapes,
    model_identity,
    read_adapter,
)
from capplug.training.hypernet_run import (
    HypernetRun,
    HypernetTrainConfig,
    HypernetTrainResult,
    relative_weight_error,
)
from capplug.training.loop import (
    SUMMARY_FILE,
    fingerprint,
)

__all__ = [
    "HypernetTrainConfig",
    "HypernetTrainResult",
    "find_teachers",
    "relative_weight_error",
    "train_hypernetwork",
]

logger = logging.getLogger(__name__)


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
    data: str | os.PathLike[str] | Pool | None = None,
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
        task_names: the tasks to train on, by their names in the pool (default: the teachers'
            tasks; with no teachers, every task of ``tasks``, or else every ``train`` task of
            the pool that has an instruction and train examples). A task without a teacher
            learns from ``L_pred`` and the KL from the base model reading the definition.
        tasks: loaded tasks by name, used instead of reading those tasks from the pool.
        chat: the base model already loaded; it is frozen and put in eval mode.
        data: the task data the tasks are read from: a folder, task file or BIG-bench sdist,
            or a :class:`~capplug.data.Pool` (default: the default pool, see
            :func:`capplug.data.open_pool`).
        progress: show progress bars (reading every task of the pool, and training).

    A resumed run rebuilds the hypernetwork from its checkpoint, whatever ``encoder`` and
    ``hidden_dim`` say.

    Raises:
        ValueError: no teachers, teachers that disagree on rank or modules, a named task that is
            not in the pool, is a dev task, or has no instruction or no train examples, or an
            ``out`` folder that holds a run with other settings.
        NoDataError: tasks to read, and no task data at ``data`` (or in the default places).
        DataError: a named task's file is unreadable or malformed.
        WrongBaseModelError: a teacher made for another base model.
    """
    config = config or HypernetTrainConfig()
    teacher_folders = _teacher_folders(teachers)
    loaded = _training_tasks(task_names, teacher_folders, tasks, data, progress)
    names = sorted(loaded)
    teacher_folders = {n: f for n, f in teacher_folders.items() if n in loaded}
    if not teacher_folders and config.reconstruction_steps > 0:
        raise ValueError(
            f"the reconstruction warm start ({config.reconstruction_steps} steps) learns from "
            f"teacher adapters, and none of the {len(names)} task(s) has one: set "
            f"reconstruction_steps=0 or give teachers"
        )
    chat, base_ref, identity, files = _base_and_teachers(chat, base, device, teacher_folders)
    folder = Path(out).expanduser().resolve()
    checkpoint = folder / "checkpoint"
    init: dict[str, str] | None = None
    if init_from is not None:
        if hypernetwork is not None:
            raise ValueError("give either hypernetwork or init_from, not both")
        init_weights = hypernetwork_folder(init_from) / WEIGHTS_FILE
        init = {"from": os.fspath(init_from), "sha256": sha256_file(init_weights)}
    hypernetwork = _hypernetwork_to_train(
        checkpoint,
        init_from,
        hypernetwork,
        fresh=lambda: _fresh_hypernetwork(
            base_ref,
            files,
            encoder=encoder,
            hidden_dim=hidden_dim,
            shape=(r, alpha, list(target_modules)),
            seed=config.seed,
        ),
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
    finished = _finished_run(folder, run_id)
    if finished is not None:
        return finished
    run = HypernetRun(hypernetwork, chat, names, files, loaded, folder, config, run_id, init=init)
    try:
        return run.train(progress=progress, on_step=on_step)
    finally:
        run.injection.remove()


def _teacher_folders(
    teachers: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None,
) -> dict[str, Path]:
    """``{task: teacher adapter folder}`` from a teachers folder, a mapping, or None."""
    if teachers is None:
        return {}
    if isinstance(teachers, Mapping):
        folders = {str(k): Path(v) for k, v in teachers.items()}
        if not folders:
            raise ValueError(
                "teachers is empty; give at least one task's teacher adapter, or None to train "
                "without teachers"
            )
        return folders
    return find_teachers(teachers)


def _base_and_teachers(
    chat: LocalChatModel | None,
    base: str | os.PathLike[str],
    device: str | torch.device | None,
    teacher_folders: Mapping[str, Path],
) -> tuple[LocalChatModel, str, Any, dict[str, Any]]:
    """The base model (loaded unless given), its reference and identity, and each teacher's
    adapter read and checked against it (and against the other teachers)."""
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
    return chat, base_ref, identity, files


def _fresh_hypernetwork(
    base_ref: str,
    files: Mapping[str, Any],
    *,
    encoder: str,
    hidden_dim: int,
    shape: tuple[int, int, list[str]],
    seed: int,
) -> Hypernetwork:
    """A new hypernetwork for ``base_ref``: the teachers' rank, alpha and modules where there
    are teachers, else ``shape``."""
    r, alpha, target_modules = shape
    if files:
        first = next(iter(files.values()))
        r, alpha = first.config.r, int(first.config.lora_alpha)
        target_modules = sorted({m.rsplit(".", 1)[-1] for m in first.modules})
    return Hypernetwork.from_base(
        base_ref,
        encoder=encoder,
        r=r,
        alpha=alpha,
        target_modules=list(target_modules),
        hidden_dim=hidden_dim,
        seed=seed,
    )


def _hypernetwork_to_train(
    checkpoint: Path,
    init_from: Any,
    given: Hypernetwork | None,
    *,
    fresh: Callable[[], Hypernetwork],
) -> Hypernetwork:
    """The checkpoint's shape when resuming, else the trained one to start from, else
    ``given``, else ``fresh()``."""
    if (checkpoint / CONFIG_FILE).is_file():
        raw = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        return Hypernetwork(HypernetworkConfig(**raw))
    if init_from is not None:
        return Hypernetwork.from_pretrained(init_from, device="cpu")
    return given if given is not None else fresh()


def _finished_run(folder: Path, run_id: str) -> HypernetTrainResult | None:
    """The result of a run already finished in ``folder`` with these settings; None if none
    finished there (another run's summary is refused)."""
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        return None
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


def _training_tasks(
    given: Sequence[str] | None,
    teachers: Mapping[str, Path],
    tasks: Mapping[str, Task] | None,
    data: str | os.PathLike[str] | Pool | None,
    progress: bool,
) -> dict[str, Task]:
    """The tasks a run trains on, by name: those named, else the teachers', else ``tasks``,
    else every train task of the pool with an instruction and train examples."""
    if given is not None:
        if isinstance(given, str):
            raise TypeError("task_names must be a list of task names, not one string")
        names = sorted(set(given))
        if not names:
            raise ValueError("task_names is empty; leave it out to train on every train task")
    elif teachers:
        names = sorted(teachers)
    elif tasks is not None:
        names = sorted(tasks)
        if not names:
            raise ValueError("tasks is empty; leave it out to read the tasks from the pool")
    else:
        pool = open_pool(data)
        found = {t.name: t for t in pool.tasks(split="train", progress=progress) if not _unfit(t)}
        if not found:
            raise ValueError(
                f"the pool at {pool.root} holds no train task with an instruction and train "
                f"examples to train the hypernetwork on"
            )
        logger.info("capplug: %d train tasks of %s have an instruction", len(found), pool.root)
        return found
    loaded: dict[str, Task] = {}
    for name in names:
        task = tasks.get(name) if tasks is not None else None
        if task is None:
            task = open_pool(data).load(name)
        problem = _unfit(task)
        if problem:
            raise ValueError(f"task {task.name!r} {problem}")
        loaded[task.name] = task
    return loaded


def _unfit(task: Task) -> str:
    """Why the hypernetwork cannot train on ``task`` (empty when it can)."""
    if task.split != "train":
        return "is a dev task, kept for measurement: the hypernetwork trains on train tasks only"
    if not task.instruction.strip():
        return "has no instruction to write an adapter from"
    if not task.split_examples("train"):
        return "has no train examples"
    return ""


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
