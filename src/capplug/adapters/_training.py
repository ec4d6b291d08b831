"""What the adapter trainers share: resumable checkpoints, the JSON log, progress, timing.

A checkpoint is a folder written beside its final place and renamed into it (so a crash never
leaves half of one): the trained tensors and the optimizer's state as safetensors, and the step,
torch's random state and the run's fingerprint as JSON. Nothing is ever unpickled on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from capplug._cache import staging_dir, write_json_atomic
from capplug._checkpoint import optimizer_tensors, restore_optimizer

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "training_summary.json"

Precision = Literal["fp32", "bf16"]


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short digest of what decides a run's result, so a resume never mixes two runs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    *,
    extra_json: Mapping[str, Any] | None = None,
) -> None:
    """Write one resumable checkpoint (trained tensors, optimizer, torch RNG, ``state``).

    ``extra_json`` names more JSON files to keep in it (a model's config, say), written inside
    the same rename so the checkpoint never holds one without the other.
    """
    with staging_dir(folder) as tmp:
        for name, data in (extra_json or {}).items():
            write_json_atomic(tmp / name, data)
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE
        )
        opt_tensors, param_groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / OPTIMIZER_FILE)
        write_json_atomic(tmp / STATE_FILE, {**state, "param_groups": param_groups})


def load_checkpoint(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    run_id: str | None = None,
    other_run: str = "other settings; give a new out folder",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer and torch RNG from a checkpoint; return its tensors and state.

    With ``run_id``, a checkpoint of another run is refused before anything is restored:
    ``ValueError("<folder> belongs to a run with <other_run>")``.
    """
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if run_id is not None and state.get("run_id") != run_id:
        raise ValueError(f"{folder} belongs to a run with {other_run}")
    tensors = load_file(folder / WEIGHTS_FILE, device=str(device))
    restore_optimizer(optimizer, load_file(folder / OPTIMIZER_FILE), state.pop("param_groups"))
    return tensors, state


def append_log(path: Path, entry: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """bfloat16 autocast when asked for (CPUs with AVX-512 BF16 and most GPUs gain from it)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def progress(total: int, done: int, desc: str, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=done, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True
    )


@dataclass
class StepTimer:
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
    description = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device.type == "cuda":
        description = torch.cuda.get_device_name(device)
    return {
        "description": description,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
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
