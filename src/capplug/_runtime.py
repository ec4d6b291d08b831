"""Torch and transformers settings shared by every model capplug runs (scorer, local LLM)."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch


def check_positive_int(value: Any, argument: str) -> None:
    """A clear ``ValueError`` naming ``argument`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1; got {value!r}")


def pick_device(device: str | torch.device | None) -> torch.device:
    """The given device, else the GPU if there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The given dtype; by default float32 on CPU and bfloat16 (or float16) on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype name such as 'float32'; got {dtype!r}")
        return resolved
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity set, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def tune_cpu_threads() -> None:
    """Never run more torch threads than the CPUs this process may use."""
    # torch sizes its pool by physical cores, which oversubscribes a container or a task set
    # pinned to fewer CPUs.
    allowed = usable_cpus()
    if torch.get_num_threads() > allowed:
        torch.set_num_threads(allowed)


def forward_parameters(model: torch.nn.Module) -> list[str]:
    """The argument names of a model's ``forward``."""
    return list(inspect.signature(model.forward).parameters)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (weight loading) for a moment."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run with torch's generators seeded, restoring them afterwards; ``None`` changes nothing."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
