"""Tables and charts shared by the benchmark scripts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def task_table(
    columns: list[str],
    labels: Mapping[str, str],
    per_task: Mapping[str, Mapping[str, Any]],
    mean: Mapping[str, float],
    fmt: Callable[[float], str],
) -> list[str]:
    """A Markdown table: one row per task (with its example count), then the mean in bold."""
    lines = [
        "| task | " + " | ".join(labels[c] for c in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for task, row in per_task.items():
        lines.append(
            f"| {task} ({row['examples']}) | " + " | ".join(fmt(row[c]) for c in columns) + " |"
        )
    lines.append("| **mean** | " + " | ".join(f"**{fmt(mean[c])}**" for c in columns) + " |")
    return lines


def bar_chart(
    path: Path, names: list[str], values: list[float], xlabel: str, *, xlim: float | None = None
) -> None:
    """A horizontal bar chart, first name on top; skipped quietly without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.barh(names[::-1], values[::-1], color="#4c72b0")
    for y, value in enumerate(values[::-1]):
        ax.text(value, y, f" {value:.1f}", va="center")
    ax.set_xlabel(xlabel)
    if xlim is not None:
        ax.set_xlim(0, xlim)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(folder: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """``<folder>/<name>.json`` (the raw result) and ``<name>.md`` (``lines``), echoed to stdout."""
    from capplug._cache import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{name}.json", result)
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def resampled_means(
    tasks: list[dict[str, list[float]]], resamples: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per bootstrap resample, each column's mean over ``tasks`` of its per-example scores.

    ``tasks`` holds, per task, one list of per-example scores per column (the same examples
    in every column). Each resample draws every task's examples with replacement, the same draw
    for all columns, so differences between columns are paired."""
    columns = [c for c in tasks[0] if all(c in t for t in tasks)]
    rng = np.random.default_rng(seed)
    means = {c: np.zeros(resamples) for c in columns}
    for task in tasks:
        n = len(task[columns[0]])
        draw = rng.integers(0, n, size=(resamples, n))
        for c in columns:
            means[c] += np.asarray(task[c], dtype=float)[draw].mean(axis=1) / len(tasks)
    return means


class ComparisonError(ValueError):
    """Two benchmark results cannot be compared example by example."""


def load_result(path: Path, benchmark: str) -> dict[str, Any]:
    """A results JSON ``benchmark`` wrote; :class:`ComparisonError` for anything else."""
    import json

    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ComparisonError(f"{path}: not a readable results JSON ({error})") from None
    if result.get("benchmark") != benchmark:
        raise ComparisonError(f"{path}: not a {benchmark} result")
    return result
