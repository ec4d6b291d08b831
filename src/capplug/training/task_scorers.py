"""From judged selections to task scorers in the store, one per task, each behind the guard.

:func:`adapt_task_scorers` groups a feedback store's judged selections by task (the system
message of a chat; or, with ``instruction_like``, every selection whose task is similar enough to
that text), and for each task with enough of them: holds out a share of its selections, trains a
LoRA task scorer on the rest (the candidates that were not chosen included), lets the guard
compare its picks with the default scorer's on the held-out ones, and stores it with the
verdict in :class:`~capplug.adapters.task_scorers.TaskScorers`. Selections then find it by
their instruction; one the guard refused is stored but not used.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capplug.adapters.store.records import AdapterRecord
from capplug.adapters.task_scorers import TaskScorers
from capplug.chat import one_line
from capplug.data.rows import LabelledPair, labelled_pairs
from capplug.scoring.guard import GuardReport, guard
from capplug.training.scorer import TrainConfig, train_scorer

__all__ = [
    "TASK_SCORER_CONFIG",
    "TaskAdaptation",
    "adapt_task_scorers",
    "feedback_tasks",
]

logger = logging.getLogger(__name__)

TASK_SCORER_CONFIG = TrainConfig(
    lora_rank=8,
    learning_rate=5e-4,
    epochs=8.0,
    batch_size=16,
    rank_weight=1.0,
    eval_every=10,
    patience=None,
)
"""The task-scorer recipe: a rank-8 LoRA, pointwise plus pairwise loss over each selection's
candidates, 8 passes. With so few examples the held-out slice goes to the guard, not to early
stopping."""


@dataclass(frozen=True)
class TaskAdaptation:
    """What happened to one task's feedback."""

    task: str
    selections: int
    """Judged selections of this task."""
    out_dir: Path | None = None
    guard: GuardReport | None = None
    record: AdapterRecord | None = None
    """The stored task scorer (``None`` when the task was skipped)."""
    skipped: str | None = None
    """Why no task scorer was made."""

    @property
    def used(self) -> bool:
        return self.guard is not None and self.guard.use and self.record is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "selections": self.selections,
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "guard": None if self.guard is None else self.guard.to_dict(),
            "task_scorer": None if self.record is None else self.record.id,
            "used": self.used,
            "skipped": self.skipped,
        }


def feedback_tasks(
    rows: Iterable[dict[str, Any]],
    *,
    instruction_like: str | None = None,
    embed: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
    threshold: float = 0.8,
) -> dict[str, list[dict[str, Any]]]:
    """Feedback rows grouped by task: by each row's ``task``, or, with ``instruction_like``,
    the rows whose task is at least ``threshold`` similar to it (by ``embed``'s vectors)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    rows = list(rows)
    if instruction_like is None:
        for row in rows:
            grouped.setdefault(str(row.get("task") or row["instruction"]), []).append(row)
        return grouped
    if embed is None:
        raise ValueError("instruction_like needs embed, the function that embeds instructions")
    tasks = sorted({str(row.get("task") or row["instruction"]) for row in rows})
    if not tasks:
        return {}
    vectors = np.asarray(embed([instruction_like, *tasks]), dtype=float)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = vectors[1:] @ vectors[0]
    close = {t for t, sim in zip(tasks, similarity, strict=True) if sim >= threshold}
    kept = [row for row in rows if str(row.get("task") or row["instruction"]) in close]
    return {instruction_like: kept} if kept else {}


def adapt_task_scorers(
    rows: Iterable[dict[str, Any]],
    task_scorers: TaskScorers,
    out_root: str | Path,
    *,
    instruction_like: str | None = None,
    config: TrainConfig = TASK_SCORER_CONFIG,
    min_selections: int = 8,
    heldout: float = 0.25,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[TaskAdaptation]:
    """Adapt, guard and store one task scorer per task of the feedback ``rows`` (as
    :meth:`FeedbackStore.rows <capplug.feedback.FeedbackStore.rows>` gives them).

    Each task's run folder is ``out_root/<hash of the task>`` (run again, an interrupted run
    resumes; a finished one is reused). Tasks with fewer than ``min_selections`` judged
    selections are skipped, and say so.
    """
    if not config.lora_rank:
        config = replace(config, lora_rank=TASK_SCORER_CONFIG.lora_rank)
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"heldout must be in (0, 1); got {heldout}")
    embed = task_scorers.store.embedding_function
    groups = feedback_tasks(
        rows, instruction_like=instruction_like, embed=embed, threshold=task_scorers.threshold
    )
    results = []
    for task, task_rows in groups.items():
        selections = len({row["group"] for row in task_rows})
        short = one_line(task, 60)
        if selections < min_selections:
            results.append(
                TaskAdaptation(
                    task,
                    selections,
                    skipped=f"{selections} judged selections; a task scorer needs at least "
                    f"{min_selections}",
                )
            )
            log(f"task {short!r}: skipped ({results[-1].skipped})")
            continue
        pairs = labelled_pairs(task_rows, where=f"judged selections of task {short!r}")
        train, held = _split(pairs, heldout, config.seed)
        out_dir = Path(out_root) / hashlib.sha256(task.encode()).hexdigest()[:16]
        log(f"task {short!r}: {selections} judged selections, adapting on {len(train)} pairs")
        scorer = task_scorers.scorer
        if not (out_dir / "adapter_config.json").is_file():
            train_scorer(
                scorer.with_weights({}),  # a copy: training must not touch the default
                train,
                out_dir,
                eval_pairs=held,
                config=config,
                data_description=f"judged selections of task {short!r}",
                progress=progress,
            )
        report = guard(scorer, scorer.with_lora(out_dir), held)
        log(f"task {short!r}: guard: {report.reason}")
        record = task_scorers.add(out_dir, task, guard=report, selections=selections)
        results.append(TaskAdaptation(task, selections, out_dir, report, record))
    return results


def _split(
    pairs: list[LabelledPair], fraction: float, seed: int
) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """Hold out ``fraction`` of the selections, at least one and never all (by group hash, so
    the same feedback holds out the same selections)."""
    groups = sorted({p.group for p in pairs})
    count = min(len(groups) - 1, max(1, math.ceil(fraction * len(groups))))
    ranked = sorted(groups, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    held = set(ranked[:count])
    return [p for p in pairs if p.group not in held], [p for p in pairs if p.group in held]
