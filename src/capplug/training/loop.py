"""The one training loop: resumable checkpoints, warm-up and linear decay, the JSON log, progress.

The scorer, the teacher LoRAs and the hypernetwork each say what one step computes
(:class:`Loop` ``run(step_fn, ...)``); the loop does the rest the same way for all three:

- the learning rate: linear warm-up over ``warmup_steps``, then linear decay to zero;
- gradient accumulation, clipping, mixed precision (bfloat16 autocast, or float16 with a
  gradient scaler where a GPU has no bfloat16);
- one line of ``train_log.jsonl`` every ``log_every`` steps (mean losses, learning rate, seconds
  per step) and at each evaluation;
- a checkpoint every ``checkpoint_every`` steps: a folder written beside its final place and
  renamed into it (a crash never leaves half of one) holding the trained tensors and the
  optimizer's state as safetensors, and the step, torch's random state and the run's identity as
  JSON. Nothing is ever unpickled on resume, and a checkpoint of another run is refused.

Why not the transformers ``Trainer`` or ``accelerate``: both save optimizer state with pickle
(``torch.load`` on resume), and neither fits the hypernetwork, whose "model" writes another
model's weights. This loop is small, runs on one device, and resumes to bit-identical weights
(``tests/unit/training/test_loop.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from capplug._cache import staging_dir, write_json_atomic

__all__ = [
    "LOG_FILE",
    "SUMMARY_FILE",
    "Loop",
    "LoopResult",
    "Precision",
    "Schedule",
    "autocast",
    "check_float",
    "check_int",
    "fingerprint",
    "lr_factor",
    "machine",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "training_summary.json"
CHECKPOINT_DIR = "checkpoint"

Precision = Literal["fp32", "bf16", "fp16"]
"""``bf16``: bfloat16 autocast (CPUs with AVX-512 BF16 and most GPUs gain from it); ``fp16``:
float16 autocast with a gradient scaler, for GPUs without bfloat16; ``fp32``: neither."""

StepFn = Callable[[int, int], "Mapping[str, torch.Tensor | float] | None"]
"""``step_fn(step, micro)``: the losses of micro-batch ``micro`` of optimizer step ``step``
(``"loss"`` is the one differentiated; other entries are logged), or ``None`` when there is no
such micro-batch (an epoch ended inside an accumulation)."""


@dataclass
class Schedule:
    """How long a run is and how it steps, logs and checkpoints."""

    steps: int
    lr: float
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    accumulate: int = 1
    """Micro-batches whose gradients add up into one optimizer step."""
    log_every: int = 10
    checkpoint_every: int = 50
    eval_every: int | None = None
    """Steps between calls of the ``evaluate`` hook (and always at the last step); ``None``: at
    the last step only, when a hook is given."""
    precision: Precision = "fp32"
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    decay_vectors: bool = True
    """Decay biases and norm weights too (``False``: matrices only, the usual choice for
    transformers)."""


def adamw(params: Mapping[str, torch.nn.Parameter], schedule: Schedule) -> torch.optim.AdamW:
    """The optimizer every capplug run uses: AdamW at the schedule's peak rate and decay."""
    if schedule.decay_vectors:
        return torch.optim.AdamW(
            list(params.values()), lr=schedule.lr, weight_decay=schedule.weight_decay
        )
    return torch.optim.AdamW(
        [
            {
                "params": [p for p in params.values() if p.ndim >= 2],
                "weight_decay": schedule.weight_decay,
            },
            {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=schedule.lr,
    )


@dataclass
class LoopResult:
    state: dict[str, Any]
    """The run's state at the end: ``step``, ``run_id``, and what the hooks kept in it."""
    wall_seconds: float
    """Training time, summed over every resumed part of the run."""
    timing: dict[str, float] = field(default_factory=dict)
    resumed: bool = False


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short digest of what decides a run's result, so a resume never mixes two runs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Autocast to bfloat16 or float16 when ``precision`` asks for it; nothing for ``fp32``."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class Loop:
    """One training run's loop over ``params`` in ``folder``, fresh or resumed.

    Args:
        folder: the run's folder; the checkpoint is ``folder/checkpoint`` and the log
            ``folder/train_log.jsonl``.
        params: the trained tensors by name (what a checkpoint saves and a resume restores).
        optimizer: built over ``params``; its learning rate is set every step from ``schedule``.
        run_id: the run's identity (:func:`fingerprint`); a checkpoint of another is refused
            with ``ValueError("<checkpoint> belongs to a run with <other_run>")``.
        label: the progress bar's name.
        extra_json: more JSON files to keep in every checkpoint (a model's config, say).
        state: the run's starting state; hooks may keep their own entries in it, and they are
            checkpointed with it.
    """

    def __init__(
        self,
        folder: Path,
        params: Mapping[str, torch.nn.Parameter],
        schedule: Schedule,
        *,
        run_id: str,
        device: torch.device,
        label: str = "training",
        other_run: str = "other settings or data; give a new out folder",
        extra_json: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        check_int(schedule.steps, "steps")
        check_int(schedule.accumulate, "accumulate")
        self.folder = folder
        self.params = dict(params)
        self.optimizer = adamw(self.params, schedule)
        self.schedule = schedule
        self.device = device
        self.label = label
        self.other_run = other_run
        self.extra_json = dict(extra_json or {})
        self.progress = progress
        self.on_step = on_step
        self.state: dict[str, Any] = {
            **(state or {}),
            "step": 0,
            "run_id": run_id,
            "elapsed_seconds": 0.0,
        }
        self.checkpoint = folder / CHECKPOINT_DIR
        self.log_path = folder / LOG_FILE
        self.scaler = torch.amp.GradScaler(device.type, enabled=schedule.precision == "fp16")
        self.resumed = False

    # ----------------------------------------------------------------------------- state

    def start(self, *, seed: int) -> bool:
        """Resume from the checkpoint if there is one (``True``), else start afresh (``False``):
        the log is cleared and torch's generator seeded, since dropout draws from it."""
        if (self.checkpoint / STATE_FILE).is_file():
            saved = json.loads((self.checkpoint / STATE_FILE).read_text(encoding="utf-8"))
            if saved.get("run_id") != self.state["run_id"]:
                raise ValueError(f"{self.checkpoint} belongs to a run with {self.other_run}")
            tensors = load_file(self.checkpoint / WEIGHTS_FILE, device=str(self.device))
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(tensors[name])
            _restore_optimizer(
                self.optimizer,
                load_file(self.checkpoint / OPTIMIZER_FILE),
                saved.pop("param_groups"),
            )
            self.state = saved
            self.resumed = True
            logger.warning(
                "capplug: resuming %s at step %d of %d",
                self.label,
                self.state["step"],
                self.schedule.steps,
            )
            return True
        self.log_path.unlink(missing_ok=True)
        torch.manual_seed(seed)
        return False

    def save(self) -> None:
        """Write the resumable checkpoint of the current step."""
        with staging_dir(self.checkpoint) as tmp:
            for name, data in self.extra_json.items():
                write_json_atomic(tmp / name, data)
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in self.params.items()},
                tmp / WEIGHTS_FILE,
            )
            tensors, param_groups = _optimizer_tensors(self.optimizer)
            save_file(tensors, tmp / OPTIMIZER_FILE)
            write_json_atomic(tmp / STATE_FILE, {**self.state, "param_groups": param_groups})

    def finish(self, result: LoopResult, **summary: Any) -> dict[str, Any]:
        """Write the run's summary and drop its checkpoint: a finished run never resumes.

        Call it once the run's output is written. The summary (:data:`SUMMARY_FILE`) holds what
        every run records (its id, steps, training time, where the time went, the machine)
        and the caller's own ``summary`` fields; it is returned as written.
        """
        import shutil

        written = {
            "run_id": self.state["run_id"],
            "steps": result.state["step"],
            "wall_seconds": round(result.wall_seconds, 3),
            "timing": result.timing,
            "machine": machine(self.device),
            **summary,
        }
        write_json_atomic(self.folder / SUMMARY_FILE, written)
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        return written

    def log(self, entry: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(entry)) + "\n")

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The run's precision around a forward pass (evaluation too)."""
        return autocast(self.device, self.schedule.precision)

    # ------------------------------------------------------------------------------ loop

    def _optimizer_step(
        self,
        step_fn: StepFn,
        step: int,
        params: list[torch.nn.Parameter],
        running: dict[str, list[float]],
    ) -> dict[str, float]:
        """One optimizer step over ``schedule.accumulate`` micro-batches (fewer where
        ``step_fn`` says the data ended); the step's losses, also added to ``running``."""
        schedule, last = self.schedule, {}
        for micro in range(schedule.accumulate):
            with self.autocast():
                losses = step_fn(step, micro)
            if losses is None:
                break
            self.scaler.scale(losses["loss"].float() / schedule.accumulate).backward()
            for key, value in losses.items():
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                last[key] = float(value)
                running[key].append(last[key])
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return last

    def run(
        self,
        step_fn: StepFn,
        *,
        evaluate: Callable[[dict[str, Any]], None] | None = None,
        describe: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
        models: tuple[torch.nn.Module, ...] = (),
    ) -> LoopResult:
        """Step until ``schedule.steps`` (or until ``evaluate`` sets ``state["stopped"]``).

        ``evaluate(state)`` runs every ``eval_every`` steps and at the last; it may keep what it
        measured in ``state`` and set ``state["stopped"] = True`` to end the run early.
        ``describe(state)`` adds fields to each log line. ``models`` are put in training mode
        while stepping and in evaluation mode at the end.
        """
        from tqdm.auto import tqdm

        schedule, state = self.schedule, self.state
        params = list(self.params.values())
        started = time.monotonic()
        resumed_wall = state["elapsed_seconds"]
        timer = _StepTimer()
        running: dict[str, list[float]] = defaultdict(list)
        bar = tqdm(
            total=schedule.steps,
            initial=state["step"],
            desc=self.label,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for model in models:
            model.train()
        try:
            while state["step"] < schedule.steps and not state.get("stopped"):
                step = state["step"]
                lr = schedule.lr * lr_factor(
                    step, warmup=schedule.warmup_steps, total=schedule.steps
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with timer.step():
                    last = self._optimizer_step(step_fn, step, params, running)
                state["step"] = step + 1
                bar.update(1)
                done = state["step"] == schedule.steps
                entry: dict[str, Any] = {"step": state["step"], **last}
                if state["step"] % schedule.log_every == 0 or done:
                    entry = {
                        "step": state["step"],
                        **(describe(state) if describe else {}),
                        **{k: sum(v) / len(v) for k, v in running.items()},
                        "lr": lr,
                        **timer.summary(),
                    }
                    running.clear()
                    self.log(entry)
                    if "loss" in entry:
                        bar.set_postfix(loss=f"{entry['loss']:.4f}")
                if evaluate is not None and (
                    done or (schedule.eval_every and state["step"] % schedule.eval_every == 0)
                ):
                    state["elapsed_seconds"] = resumed_wall + time.monotonic() - started
                    evaluate(state)
                    for model in models:
                        model.train()
                done = done or bool(state.get("stopped"))
                if state["step"] % schedule.checkpoint_every == 0 and not done:
                    state["elapsed_seconds"] = resumed_wall + time.monotonic() - started
                    self.save()
                if self.on_step is not None:
                    self.on_step(state["step"], entry)
        finally:
            bar.close()
            for model in models:
                model.eval()
        wall = resumed_wall + time.monotonic() - started
        state["elapsed_seconds"] = wall
        return LoopResult(
            state=state, wall_seconds=wall, timing=timer.summary(), resumed=self.resumed
        )


# --------------------------------------------------------------------------------- helpers


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """The optimizer's state tensors and torch's RNG states as flat safetensors-ready tensors,
    and its JSON-able ``param_groups``."""
    opt = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().to("cpu").contiguous()
        for index, slot in opt["state"].items()
        for key, value in slot.items()
        if isinstance(value, torch.Tensor)
    }
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors, opt["param_groups"]


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], param_groups: Any
) -> None:
    slots: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        index, name = key.split(".", 1)
        slots[int(index)][name] = value
    optimizer.load_state_dict({"state": dict(slots), "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class _StepTimer:
    """Wall and CPU seconds per optimizer step (CPU time counts every thread of the process)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)

    def summary(self) -> dict[str, float]:
        if not self.wall:
            return {}
        # The first step pays one-off costs (allocator warm-up, lazy init): leave it out.
        wall = self.wall[1:] or self.wall
        cpu = self.cpu[1:] or self.cpu
        return {
            "wall_seconds_per_step": round(sum(wall) / len(wall), 3),
            "cpu_seconds_per_step": round(sum(cpu) / len(cpu), 3),
        }


def machine(device: torch.device) -> dict[str, Any]:
    """What a model card says the run ran on."""
    description = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device.type == "cuda":
        description = torch.cuda.get_device_name(device)
    return {
        "description": description,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def check_int(value: Any, name: str, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_float(value: Any, name: str, *, minimum: float = 0.0, inclusive: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a number {relation} {minimum}; got {value!r}")
