"""Adapting task scorers as feedback arrives, with no command to run (opt-in).

:class:`AutoAdapter` watches judgements as they are stored (its :meth:`~AutoAdapter.notify`
is called with each judged selection's id) and, once a task has ``min_selections`` judged
selections, and again after every ``every`` more, runs what ``capplug adapt --from-feedback
--task-scorers`` runs for that task (:func:`~capplug.training.task_scorers.adapt_task_scorers`):
train, guard, store. It works in one background thread, one task at a time, so the server that
owns it keeps answering; selections use the new task scorer from the next request on (the
store reloads live), where the guard allowed it.

    auto = AutoAdapter(FeedbackStore(), TaskScorers(scorer=Scorer()), every=8)
    ...
    auto.notify(selection_id)        # after each judgement; returns at once
    auto.wait()                      # the runs started so far (tests, shutdown)

The surfaces that record selections take one as ``auto_adapt``: ``create_proxy_app`` and
``capplug serve proxy --auto-adapt N`` (notified by ``POST /v1/feedback``),
:class:`capplug.Reranker` (notified by :meth:`~capplug.Reranker.judge`, which the MCP server's
``judge`` tool calls: ``capplug mcp --auto-adapt N``) and the LangChain callback handlers
(notified by their ``judge``).

Each task scorer is stored with the number of judged selections it was adapted on, so after a
restart a task is adapted again once ``every`` more than that have arrived, not at once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any

from capplug._runtime import check_positive_int
from capplug.feedback import check_watcher, require_recording
from capplug.training.scorer import TrainConfig
from capplug.training.task_scorers import TASK_SCORER_CONFIG, TaskAdaptation, adapt_task_scorers

__all__ = ["AutoAdapter", "as_auto_adapter"]

logger = logging.getLogger(__name__)


class AutoAdapter:
    """Adapt a task's scorer in the background once enough new judgements arrived.

    Args:
        feedback: the :class:`capplug.feedback.FeedbackStore` the judgements go to.
        task_scorers: the :class:`capplug.adapters.TaskScorers` the new ones go to.
        every: adapt a task again after this many new judged selections.
        min_selections: the first adaptation of a task waits for this many (as
            ``capplug adapt --min-selections``).
        out_root: where the training runs go (default: ``runs/auto`` in the task-scorer store).
        config: the recipe (default: the task-scorer recipe, as ``capplug adapt``).
    """

    def __init__(
        self,
        feedback: Any,
        task_scorers: Any,
        *,
        every: int = 8,
        min_selections: int = 8,
        out_root: str | Path | None = None,
        config: TrainConfig = TASK_SCORER_CONFIG,
    ) -> None:
        check_positive_int(every, "every")
        check_positive_int(min_selections, "min_selections")
        if min_selections < 2:
            raise ValueError("min_selections must be >= 2 (one to train on, one for the guard)")
        self.feedback = feedback
        self.task_scorers = task_scorers
        self.every = every
        self.min_selections = min_selections
        self.out_root = (
            Path(out_root) if out_root is not None else task_scorers.store.root / "runs" / "auto"
        )
        self.config = config
        self.results: list[TaskAdaptation] = []
        """Every task's outcome, in the order the runs finished."""
        self.errors: list[str] = []
        """Runs that failed, as one line each (the server keeps answering)."""
        self._lock = threading.Lock()
        # task -> judged selections when last adapted (None: never), read from the store once
        self._adapted: dict[str, int | None] = {}
        self._running: set[str] = set()
        self._futures: list[Future[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capplug-adapt")

    def __repr__(self) -> str:
        return (
            f"AutoAdapter(every={self.every}, min_selections={self.min_selections}, "
            f"adapted={sum(v is not None for v in self._adapted.values())}, "
            f"running={sorted(self._running)})"
        )

    def notify(self, selection_id: str) -> Future[None] | None:
        """A judgement of ``selection_id`` was stored: start its task's adaptation if it is
        due (returns its future), else None. Cheap, and never raises for a bad id (logged)."""
        try:
            task = self.feedback.selection(selection_id)["task"]
            judged = self.feedback.judged_selections(task)
            with self._lock:
                known = task in self._adapted
            if not known:  # the first judgement of this task since start: what was stored?
                before = self.task_scorers.adapted_on(task)
                with self._lock:
                    self._adapted.setdefault(task, before)
        except Exception as exc:
            logger.warning("auto-adapt: cannot read selection %s: %s", selection_id, exc)
            return None
        with self._lock:
            last = self._adapted[task]
            due = judged >= self.min_selections and (last is None or judged - last >= self.every)
            if not due or task in self._running:
                return None
            self._running.add(task)
            future = self._executor.submit(self._adapt, task, judged)
            self._futures.append(future)
        return future

    def wait(self, timeout: float | None = None) -> list[TaskAdaptation]:
        """Wait for the runs started so far; every outcome so far."""
        with self._lock:
            futures = list(self._futures)
        wait_for(futures, timeout=timeout)
        with self._lock:
            return list(self.results)

    def close(self) -> None:
        """Finish the run in progress and start no more."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _adapt(self, task: str, judged: int) -> None:
        try:
            rows = list(self.feedback.rows(task=task))
            logger.info("auto-adapt: %d judged selections of task %.60r: adapting", judged, task)
            results = adapt_task_scorers(
                rows,
                self.task_scorers,
                self.out_root / str(judged),
                config=self.config,
                min_selections=self.min_selections,
                progress=False,
                log=logger.info,
            )
            with self._lock:
                self._adapted[task] = judged
                self.results.extend(results)
        except Exception as exc:
            logger.exception("auto-adapt: task %.60r failed", task)
            with self._lock:
                self.errors.append(f"{task[:60]!r}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._running.discard(task)


def as_auto_adapter(value: Any, feedback: Any, task_scorers: Any, *, owner: str) -> Any:
    """The :class:`AutoAdapter` a caller means by ``auto_adapt``: ``None`` for none, a count
    (adapt a task again after every that many judged selections, putting the task scorers in
    ``task_scorers``), or one made already, which must watch ``feedback``, the store ``owner``
    records its selections in (:func:`capplug.feedback.check_watcher`).

    Raises:
        ValueError: no feedback store, no task scorers for a count, or an AutoAdapter watching
            another feedback store.
        TypeError: anything else.
    """
    if value is None or isinstance(value, AutoAdapter):
        return check_watcher(value, feedback, owner=owner)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"auto_adapt must be a count, an AutoAdapter or None; got {value!r}")
    require_recording(feedback, owner=owner)
    if task_scorers is None:
        raise ValueError(
            f"auto_adapt={value} needs task scorers to put the adapted scorers in: give {owner} "
            "task_scorers=..., or give an AutoAdapter(feedback, capplug.adapters.TaskScorers(...))"
        )
    return AutoAdapter(feedback, task_scorers, every=value)
