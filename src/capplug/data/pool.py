"""A pool of task data: where it is, which tasks it holds, their splits, and loading them.

Where the data comes from, in order: the path given (``data=``, ``--data DIR``), the
``CAPPLUG_DATA`` setting, then ``../shared/data`` beside a source checkout of capplug. A path may
be a folder of any format :mod:`capplug.data.formats` reads (with or without a
``manifest.json``), a single task file, or a ``bigbench-1.0.0.tar.gz`` sdist.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal

from capplug._cache import sha256_file
from capplug.data.formats import MANIFEST, SOURCES, TaskFile, discover, read_task
from capplug.data.tasks import SPLITS, Split, Task
from capplug.errors import DataError, NoDataError, UnknownTaskError

__all__ = [
    "DATA_ENV",
    "DevBenchmark",
    "Pool",
    "PoolSummary",
    "SourceCount",
    "add_data_option",
    "data_paths",
    "load_task",
    "open_pool",
    "task_names",
]

logger = logging.getLogger(__name__)

DATA_ENV = "CAPPLUG_DATA"
DevBenchmark = Literal["zero_shot_choice", "rerank_generation", "instruction_to_adapter"]
_CACHED_TASKS = 64


def data_paths(data: str | os.PathLike[str] | None = None) -> list[Path]:
    """The places looked in for task data, in order: ``data``, ``$CAPPLUG_DATA``, and
    ``../shared/data`` beside a source checkout of capplug."""
    places = []
    if data is not None:
        places.append(Path(data).expanduser())
    if os.environ.get(DATA_ENV):
        places.append(Path(os.environ[DATA_ENV]).expanduser())
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file():
        places.append(checkout.parent / "shared" / "data")
    return places


def add_data_option(parser: argparse.ArgumentParser) -> None:
    """``--data PATH`` and ``--strict``: how every command and benchmark that reads tasks is
    pointed at them (pass ``args.data`` and ``args.strict`` to :func:`open_pool`)."""
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="task data: a folder of BIG-bench, Natural Instructions, P3, BBH, "
        "instruction-induction or JSONL task files (with or without a manifest.json), one such "
        f"file, or a bigbench-1.0.0.tar.gz (default: ${DATA_ENV}, then ../shared/data beside a "
        "source checkout of capplug)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unusable task file instead of skipping it with a message",
    )


def open_pool(data: str | os.PathLike[str] | Pool | None = None, *, strict: bool = False) -> Pool:
    """The pool at ``data``, or at the first place of :func:`data_paths` that exists.

    Raises:
        NoDataError: ``data`` was given and does not exist, or none of the places exists (the
            message lists them and says how to point capplug at data).
    """
    if isinstance(data, Pool):
        return data
    places = data_paths(data)
    if data is not None and not places[0].exists():
        raise NoDataError(
            f"no task data at {places[0]}: give --data (or {DATA_ENV}) a folder of task files, "
            f"a task file or a bigbench-1.0.0.tar.gz"
        )
    for place in places:
        if place.exists():
            return _open(str(place.resolve()), strict)
    looked = ", ".join(str(p) for p in places) or "nowhere"
    raise NoDataError(
        f"no task data found (looked in: {looked}); give --data DIR or set {DATA_ENV}=DIR to a "
        f"folder of BIG-bench, Natural Instructions, P3, BBH or JSONL task files"
    )


@functools.lru_cache(maxsize=8)
def _open(path: str, strict: bool) -> Pool:
    return Pool(path, strict=strict)


def load_task(name: str, *, data: str | os.PathLike[str] | Pool | None = None) -> Task:
    """One task of the pool (see :func:`open_pool`) by name, e.g. ``"bigbench/qa_wikidata"``;
    a name without its source (``"qa_wikidata"``) is enough when only one task has it."""
    return open_pool(data).load(name)


def task_names(
    split: Split | None = "train",
    benchmark: DevBenchmark | None = None,
    *,
    data: str | os.PathLike[str] | Pool | None = None,
) -> list[str]:
    """Task names of one split of the pool (see :func:`Pool.names`)."""
    return open_pool(data).names(split, benchmark=benchmark)


@dataclass
class SourceCount:
    """What a pool holds of one source and split."""

    source: str
    split: str
    tasks: int = 0
    examples: int = 0
    dropped: int = 0
    """Examples left out when read: exact duplicates, or no reference."""
    listed_examples: int | None = None
    """The examples the manifest lists for these tasks, where it gives counts."""


@dataclass
class PoolSummary:
    """Tasks and examples per source and split, and what was passed over and why."""

    root: str
    manifest: bool
    counts: list[SourceCount]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    families: int = 0
    seconds: float = 0.0
    read: bool = True
    """Whether every task was read (counts are real) or only listed (manifest counts)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "manifest": self.manifest,
            "read": self.read,
            "families": self.families,
            "seconds": round(self.seconds, 2),
            "sources": [c.__dict__ for c in self.counts],
            "skipped": [{"path": p, "why": w} for p, w in self.skipped],
        }

    def format(self) -> str:
        """A table for people: one line per source and split, then what was skipped."""
        head = f"{self.root} ({'manifest.json' if self.manifest else 'no manifest: every task counts as train'})"
        lines = [head, f"{'source':<28} {'split':<6} {'tasks':>6} {'examples':>9}"]
        for c in self.counts:
            note = ""
            if self.read and c.dropped:
                note = f"  ({c.dropped} left out: duplicates or no reference)"
            if self.read and c.listed_examples not in (None, c.examples + c.dropped):
                note += f"  (the manifest lists {c.listed_examples})"
            lines.append(f"{c.source:<28} {c.split:<6} {c.tasks:>6} {c.examples:>9}{note}")
        tasks = sum(c.tasks for c in self.counts)
        examples = sum(c.examples for c in self.counts)
        lines.append(f"{'all':<28} {'':<6} {tasks:>6} {examples:>9}  in {self.families} families")
        if not self.read:
            lines.append(
                "(example counts from the manifest; run without --quick to read every file)"
            )
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


class Pool:
    """The tasks of one data folder (or file, or BIG-bench sdist), loaded on demand.

    Listing a pool reads only its manifest (or each file's first bytes); a task is parsed when it
    is loaded, its sha256 checked against the manifest's, and the last 64 loaded stay in memory.
    With ``strict``, :meth:`tasks` stops at the first unusable task instead of skipping it.
    """

    def __init__(self, root: str | os.PathLike[str], *, strict: bool = False) -> None:
        path = Path(root).expanduser().resolve()
        if not path.exists():
            raise NoDataError(f"no task data at {path}")
        self.strict = strict
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Task] = OrderedDict()
        self._verified: set[tuple[str, int, int]] = set()
        self.root = path
        self.has_manifest = path.is_dir() and (path / MANIFEST).is_file()
        entries, self.skipped = self._discover(path)
        self._entries = {e.name: e for e in entries}
        if not self._entries and not self.skipped:
            raise NoDataError(
                f"no task files in {path}: give a folder of BIG-bench, Natural Instructions, P3, "
                f"BBH or JSONL task files"
            )

    def _discover(self, path: Path) -> tuple[list[TaskFile], list[tuple[str, str]]]:
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            from capplug.data.bigbench import extract_tasks, sdist_splits

            folder = extract_tasks(archive=path) / "tasks"
            entries, skipped = discover(folder)
            splits = sdist_splits()
            names = {e.name: e.name.removeprefix("bigbench/") for e in entries}
            return [
                replace(e, split=splits[names[e.name]]) for e in entries if names[e.name] in splits
            ], skipped
        if path.is_file():
            entries, skipped = discover(path.parent)
            return [e for e in entries if path in e.paths], skipped
        return discover(path)

    def __repr__(self) -> str:
        return f"Pool({str(self.root)!r}, tasks={len(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def entry(self, name: str) -> TaskFile:
        """What the pool knows of a task before reading it (files, split, family)."""
        return self._entries[self.resolve(name)]

    def names(
        self,
        split: Split | None = "train",
        *,
        source: str | None = None,
        benchmark: DevBenchmark | None = None,
    ) -> list[str]:
        """Task names, sorted: of one split (``None``: both), one source, or one dev benchmark's
        list (those of its tasks this pool has as ``dev``; every dev task of a pool that has
        none of any list's tasks, such as a user's own)."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None; got {split!r}")
        if source is not None and source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
        if benchmark is not None:
            if split != "dev":
                raise ValueError(
                    f"benchmark applies to split='dev' only; got split={split!r}, "
                    f"benchmark={benchmark!r}"
                )
            lists = dev_benchmarks()
            if benchmark not in lists:
                raise ValueError(f"benchmark must be one of {sorted(lists)}; got {benchmark!r}")
            listed = [n for n in lists[benchmark] if self._is_dev(n)]
            if listed or any(self._is_dev(n) for names in lists.values() for n in names):
                return listed  # a pool that has the lists keeps them apart
        return sorted(
            e.name
            for e in self._entries.values()
            if (split is None or e.split == split) and (source is None or e.source == source)
        )

    def _is_dev(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.split == "dev"

    def family(self, name: str) -> str:
        """The dataset family of a task: tasks of one family go in one validation fold."""
        return self.entry(name).family

    def folds(self, k: int = 5, *, split: Split = "train", seed: int = 0) -> list[list[str]]:
        """``k`` folds of the split's task names, every family inside one fold, for choosing
        settings on held-out datasets. Families go, largest first (ties in a seeded order), to
        the fold with the fewest tasks so far, so folds are as even as the families allow."""
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an integer >= 2; got {k!r}")
        by_family: dict[str, list[str]] = defaultdict(list)
        for name in self.names(split):
            by_family[self._entries[name].family].append(name)
        if len(by_family) < k:
            raise ValueError(
                f"{len(by_family)} families of {split} tasks cannot fill {k} folds; use fewer"
            )

        def order(family: str) -> tuple[int, str]:
            digest = hashlib.sha1(f"{seed}\x00{family}".encode()).hexdigest()
            return (-len(by_family[family]), digest)

        folds: list[list[str]] = [[] for _ in range(k)]
        for family in sorted(by_family, key=order):
            smallest = min(range(k), key=lambda i: (len(folds[i]), i))
            folds[smallest] += by_family[family]
        return [sorted(fold) for fold in folds]

    def resolve(self, name: str) -> str:
        """The pool's name for ``name``: itself, or the one task whose name ends with it.

        Raises:
            UnknownTaskError: no task has that name, or several do (the message lists them);
                a ``KeyError`` and a ``DataError``.
        """
        found = self._find(name)
        if found is None:
            close = [n for n in self._entries if n.endswith(name.rsplit("/", 1)[-1])][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownTaskError(f"no task {name!r} in the pool at {self.root}{hint}")
        if isinstance(found, list):
            raise UnknownTaskError(f"{name!r} names several tasks; give one of: {', '.join(found)}")
        return found

    def _find(self, name: str) -> str | list[str] | None:
        if name in self._entries:
            return name
        matches = [n for n in self._entries if n.endswith("/" + name)]
        if len(matches) == 1:
            return matches[0]
        return matches or None

    def load(self, name: str) -> Task:
        """One task, parsed (and checked against the manifest's sha256) on first use.

        Raises:
            UnknownTaskError: no such task (see :meth:`resolve`).
            DataError: its file is unreadable, malformed or changed (the message names it).
        """
        key = self.resolve(name)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        entry = self._entries[key]
        self._verify(entry)
        task = read_task(entry)
        if not task.examples:
            raise DataError(f"{task.path or key}: holds no examples")
        with self._lock:
            self._cache[key] = task
            while len(self._cache) > _CACHED_TASKS:
                self._cache.popitem(last=False)
        return task

    def tasks(
        self,
        names: Sequence[str] | None = None,
        *,
        split: Split | None = "train",
        progress: bool = False,
    ) -> Iterator[Task]:
        """Load tasks one after the other (``names``, or every task of ``split``). An unusable
        one is logged and skipped (and added to :attr:`skipped`), or raised with ``strict``."""
        from tqdm.auto import tqdm

        chosen = list(names) if names is not None else self.names(split)
        for name in tqdm(chosen, desc="reading tasks", unit="task", disable=not progress):
            try:
                yield self.load(name)
            except DataError as exc:
                if self.strict:
                    raise
                logger.warning("skipped task %s: %s", name, exc)
                self.skipped.append((name, str(exc)))

    def summary(self, *, read: bool = True, progress: bool = False) -> PoolSummary:
        """Tasks and examples per source and split; ``read=False`` trusts the manifest's
        counts instead of reading every file."""
        started = time.perf_counter()
        counts: dict[tuple[str, str], SourceCount] = {}
        for entry in self._entries.values():
            counts.setdefault((entry.source, entry.split), SourceCount(entry.source, entry.split))
        usable: set[str] = set()
        if read:
            for task in self.tasks(sorted(self._entries), split=None, progress=progress):
                count = counts[(task.source, task.split)]
                count.tasks += 1
                count.examples += len(task.examples)
                count.dropped += task.dropped
                usable.add(task.name)
        else:
            for entry in self._entries.values():
                count = counts[(entry.source, entry.split)]
                count.tasks += 1
                count.examples += entry.examples or 0
                usable.add(entry.name)
        listed: dict[tuple[str, str], int] = defaultdict(int)
        for name in usable:  # what the manifest lists for the tasks that were read
            entry = self._entries[name]
            if entry.examples is not None:
                listed[(entry.source, entry.split)] += entry.examples
        for key, count in counts.items():
            count.listed_examples = listed.get(key)
        skipped = list(self.skipped)
        return PoolSummary(
            root=str(self.root),
            manifest=self.has_manifest,
            counts=sorted(
                (c for c in counts.values() if c.tasks),
                key=lambda c: (SOURCES.index(c.source), SPLITS.index(c.split)),  # type: ignore[arg-type]
            ),
            skipped=skipped,
            families=len({self._entries[n].family for n in usable}),
            seconds=time.perf_counter() - started,
            read=read,
        )

    def _verify(self, entry: TaskFile) -> None:
        for path in entry.paths:
            expected = entry.sha256.get(str(path))
            if expected is None:
                continue
            try:
                stat = path.stat()
            except OSError as exc:
                raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key in self._verified:
                continue
            if sha256_file(path) != expected:
                raise DataError(
                    f"{path}: its sha256 differs from the one in {self.root / MANIFEST} (the file "
                    f"was changed or truncated)"
                )
            self._verified.add(key)


@functools.cache
def dev_benchmarks() -> dict[str, list[str]]:
    """Each dev benchmark's tasks, as named in the shared pool."""
    text = resources.files("capplug.data").joinpath("dev_benchmarks.json").read_text("utf-8")
    return json.loads(text)
