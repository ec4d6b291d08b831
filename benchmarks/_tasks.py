"""The benchmarks' task data: the task pool (``--data``), its dev lists, and what those lists
lack of the original BIG-bench ones.

Every benchmark that reads tasks takes ``--data PATH`` (default: ``$CAPPLUG_DATA``, then
``../shared/data`` beside the checkout) and ``--strict``. A dev benchmark runs on the tasks the
pool marks ``dev`` for it; where that list is shorter than the original BIG-bench list (tasks
that could not be recovered), the report says which tasks are left out and how many remain.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from capplug.data import SOURCES, Pool, add_data_option, open_pool
from capplug.errors import DataError

__all__ = [
    "add_data_option",
    "dev_list",
    "dev_list_lines",
    "dev_tasks",
    "open_data",
    "original_dev_list",
    "resolve_tasks",
]

# The original lists named BIG-bench's own Natural-Instructions copies this way.
_ORIGINAL_NI = "natural_instructions/"


def open_data(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Pool:
    """The task pool ``--data`` names (default: the default pool), with ``--strict``.

    Without task data, a ``parser`` stops with its usage error (the message says where capplug
    looked and how to give data); without one, the :class:`~capplug.errors.DataError` is raised.
    """
    try:
        return open_pool(getattr(args, "data", None), strict=getattr(args, "strict", False))
    except DataError as exc:
        if parser is None:
            raise
        parser.error(str(exc))


def dev_tasks(pool: Pool, *benchmarks: str) -> list[str]:
    """The pool's dev tasks of each benchmark, in list order, each task once.

    Raises:
        DataError: the pool marks no task ``dev`` for them (nothing to measure on).
    """
    names = [name for benchmark in benchmarks for name in pool.names("dev", benchmark=benchmark)]
    if not names:
        listed = " and ".join(f"dev.{b}" for b in benchmarks)
        raise DataError(
            f"the task pool at {pool.root} has no dev tasks for {listed}: its manifest.json "
            f"marks none 'dev' (give --data a pool whose manifest does, such as ../shared/data)"
        )
    return list(dict.fromkeys(names))


def resolve_tasks(
    parser: argparse.ArgumentParser,
    pool: Pool,
    given: Sequence[str] | None,
    allowed: Sequence[str],
    what: str,
) -> list[str] | None:
    """``--tasks`` as the pool names them (a name without its source, ``qa_wikidata``, is enough
    when only one task has it), each checked to be one of ``allowed``; ``None`` when not given."""
    if not given:
        return None
    chosen = []
    for name in given:
        try:
            full = pool.resolve(name)
        except KeyError as exc:
            parser.error(f"--tasks: {exc.args[0]}")
        if full not in allowed:
            shown = ", ".join(allowed) if len(allowed) <= 12 else f"{len(allowed)} in the pool"
            parser.error(f"--tasks must be {what} tasks ({shown}); {name!r} is not one")
        chosen.append(full)
    return list(dict.fromkeys(chosen))


@functools.cache
def _original_lists() -> dict[str, list[str]]:
    text = resources.files("capplug.data").joinpath("bigbench_splits.json").read_text("utf-8")
    return dict(json.loads(text)["dev"])


def original_dev_list(benchmark: str) -> list[str]:
    """The dev benchmark's tasks as the original BIG-bench lists named them (before recovery)."""
    return list(_original_lists()[benchmark])


def _bare(name: str) -> str:
    """A task's name without its source (``bigbench/tense``, ``natural_instructions/subtask043``
    and ``natural_instructions_v1/subtask043`` become ``tense`` and ``subtask043``)."""
    head, sep, rest = name.partition("/")
    if sep and (head in SOURCES or name.startswith(_ORIGINAL_NI)):
        return rest
    return name


def dev_list(pool: Pool, benchmark: str) -> dict[str, Any]:
    """What the pool holds of one dev benchmark's original list: the tasks it runs on, those of
    the original list it has, and those it lacks (could not be recovered)."""
    tasks = pool.names("dev", benchmark=benchmark)  # type: ignore[arg-type]
    original = original_dev_list(benchmark)
    held = {_bare(name) for name in tasks}
    return {
        "benchmark": benchmark,
        "tasks": tasks,
        "original": len(original),
        "kept": [name for name in original if _bare(name) in held],
        "missing": [name for name in original if _bare(name) not in held],
    }


def _are(count: int) -> str:
    return "is" if count == 1 else "are"


def dev_list_lines(lists: Iterable[dict[str, Any]], ran: Iterable[str]) -> list[str]:
    """For each dev list shorter than the original (or a run on part of it), one line that says
    which tasks are left out and how many remain; no lines when every list is whole, and none for
    a list the run has no task of."""
    ran_set = set(ran)
    lines = []
    for info in lists:
        tasks, kept, missing = info["tasks"], info["kept"], info["missing"]
        name, total = f"dev.{info['benchmark']}", info["original"]
        here = [t for t in tasks if t in ran_set]
        if not here:
            continue
        parts = []
        if missing:
            parts.append(
                f"{name}: {len(kept)} of the {total} tasks of the original BIG-bench list "
                f"{_are(len(kept))} in the task pool; {len(missing)} could not be recovered and "
                f"{_are(len(missing))} left out ({', '.join(missing)}), so its figures are over "
                f"{len(tasks)} tasks and do not compare with reports on all {total}."
            )
        extra = [t for t in tasks if _bare(t) not in {_bare(k) for k in kept}]
        if extra:
            parts.append(
                f"The pool's own dev tasks stand in for the list: {', '.join(extra)}."
                if not kept
                else f"The pool adds dev tasks not on the original list: {', '.join(extra)}."
            )
        if len(here) < len(tasks):
            parts.append(f"This run covers {len(here)} of the {len(tasks)} ({', '.join(here)}).")
        if parts:
            lines.append(" ".join(parts))
    return lines
