"""Read BIG-bench 1.0.0 tasks from its PyPI sdist, building prompts exactly as BIG-bench does.

The sdist is fetched once with ``pip download --no-deps`` (installing it would pull
TensorFlow). One sequential pass over the 358 MB tarball copies the ``task.json`` of every
``train`` and ``dev`` task into the capplug cache; later loads read from there. Tasks in
neither list are reserved for outside evaluation and are never extracted or loaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
import tarfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from tqdm.auto import tqdm

from capplug._cache import (
    cache_home,
    download_distribution,
    lock_for,
    sha256_file,
    staging_dir,
    write_json_atomic,
)
from capplug.errors import BigBenchArchiveError

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

Split = Literal["train", "dev"]
DevBenchmark = Literal["zero_shot_choice", "rerank_generation", "instruction_to_adapter"]

# BIG-bench's own defaults (bigbench/api/json_task.py, JsonTask.load_and_process_json).
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
# JsonTask's default random_seed; default_format_fn re-seeds it for every example.
_CHOICE_SEED = 42
_GENERATIVE_METRICS = frozenset(
    {
        "bleu",
        "bleurt",
        "exact_str_match",
        "case_insensitive_str_match",
        "sequence_f1",
        "numeric_match_with_0_1_relative_error",
        "rouge",
    }
)
_TASKS_DIR = "/bigbench/benchmark_tasks/"
_EXAMPLE_FIELDS = frozenset({"input", "target", "target_scores"})
_MANIFEST = "manifest.json"
_NATURAL_INSTRUCTIONS = "natural_instructions/"


@dataclass(frozen=True, slots=True)
class Example:
    """One BIG-bench example with its prompt built the BIG-bench way."""

    task: str
    """Task name: its path below ``benchmark_tasks`` (``arithmetic/1_digit_addition``)."""
    index: int
    """Position in the task file's ``examples`` list: a stable id across versions of capplug."""
    input: str
    """The raw ``input`` field, before prefixes or choices."""
    prompt: str
    """``task_prefix`` + ``query``: what BIG-bench shows a model zero-shot."""
    query: str
    """``example_input_prefix`` + input (+ appended choices) + ``example_output_prefix``."""
    targets: list[str]
    """References: the ``target`` field, or, for pure multiple choice, the top-scored options."""
    target_scores: dict[str, float] | None = None
    """Multiple-choice options (in file order) and their scores; ``None`` for generative ones."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Any other fields of the example (``comment``, ``id``...), which BIG-bench ignores."""

    @property
    def is_test(self) -> bool:
        """Whether the ``example_split`` rule puts this example in the test part."""
        return is_test_example(self.task, self.input)


@dataclass(frozen=True, slots=True)
class Task:
    """A BIG-bench task (or subtask): its formatting settings and its examples."""

    name: str
    description: str
    examples: list[Example]
    task_prefix: str = ""
    input_prefix: str = DEFAULT_INPUT_PREFIX
    output_prefix: str = DEFAULT_OUTPUT_PREFIX
    choice_prefix: str = DEFAULT_CHOICE_PREFIX
    append_choices_to_input: bool = True
    """As BIG-bench applies it: the raw value's truthiness (the string ``"false"`` counts as true)."""
    metrics: list[str] = field(default_factory=list)
    preferred_score: str = ""
    keywords: list[str] = field(default_factory=list)
    stop_string: str | None = None
    output_regex: str | None = None
    definition: str | None = None
    """The Natural-Instructions definition (that task's ``task_prefix``); ``None`` elsewhere."""
    duplicates_dropped: int = 0
    """Exact duplicate examples dropped, as BIG-bench drops them (the first copy is kept)."""

    @property
    def is_multiple_choice(self) -> bool:
        """Every example carries ``target_scores`` options."""
        return bool(self.examples) and all(e.target_scores is not None for e in self.examples)

    @property
    def is_generative(self) -> bool:
        """The task is scored on generated text (it has a generative metric)."""
        return bool(_GENERATIVE_METRICS.intersection(self.metrics))

    def split(self, part: Literal["train", "test"]) -> list[Example]:
        """The examples on one side of the ``example_split`` rule, in file order."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test'; got {part!r}")
        want_test = part == "test"
        return [e for e in self.examples if e.is_test == want_test]


def task_names(split: Split, benchmark: DevBenchmark | None = None) -> list[str]:
    """Task names of one split, in the order of ``bigbench_splits.json``."""
    splits = _splits()
    if split == "train":
        if benchmark is not None:
            raise ValueError(
                f"benchmark applies to split='dev' only; got split='train', benchmark={benchmark!r}"
            )
        return list(splits["train"])
    if split == "dev":
        dev: dict[str, list[str]] = splits["dev"]
        if benchmark is None:
            return list(dict.fromkeys(name for names in dev.values() for name in names))
        if benchmark not in dev:
            raise ValueError(f"benchmark must be one of {sorted(dev)}; got {benchmark!r}")
        return list(dev[benchmark])
    raise ValueError(f"split must be 'train' or 'dev'; got {split!r}")


def is_test_example(task: str, example_input: str) -> bool:
    """The ``example_split`` rule: sha1 of ``task + '\\n' + input``, as an integer, mod 10 < 3."""
    digest = hashlib.sha1((task + "\n" + example_input).encode()).hexdigest()
    return int(digest, 16) % 10 < 3


def load_task(name: str, *, archive: str | os.PathLike[str] | None = None) -> Task:
    """Load one ``train`` or ``dev`` task, extracting the archive into the cache on first use.

    Args:
        name: the task's path below ``benchmark_tasks``, e.g. ``"arithmetic/1_digit_addition"``.
        archive: a ``bigbench-1.0.0.tar.gz`` you already have; by default the pinned sdist is
            fetched with pip into the capplug cache.
    """
    _check_name(name)
    folder = extract_tasks(archive=archive)
    path = folder / "tasks" / name / "task.json"
    if not path.is_file():
        raise BigBenchArchiveError(
            f"task {name!r} is in the train/dev lists but not in the archive extracted at "
            f"{folder}; pass archive= the bigbench {BIGBENCH_VERSION} sdist"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise BigBenchArchiveError(
            f"cached task file {path} is unreadable ({exc}); delete {folder} and load again"
        ) from exc
    return parse_task(name, data)


def extract_tasks(*, archive: str | os.PathLike[str] | None = None) -> Path:
    """Extract the ``task.json`` of every train and dev task once; return the cache folder.

    The folder holds ``tasks/<name>/task.json`` and a ``manifest.json``. It is built beside
    its final place and renamed into it, under a file lock, so concurrent callers extract once.
    """
    wanted = _allowed_names()
    archive_path = Path(archive).expanduser().resolve() if archive is not None else None
    if archive_path is not None and not archive_path.is_file():
        raise FileNotFoundError(
            f"archive {str(archive_path)!r} does not exist; pass the path of "
            f"bigbench-{BIGBENCH_VERSION}.tar.gz, or leave archive=None to fetch it with pip"
        )
    digest = BIGBENCH_SHA256 if archive_path is None else _archive_digest(archive_path)
    folder = cache_home() / f"bigbench-{BIGBENCH_VERSION}" / digest[:16]
    if _manifest_covers(folder, wanted):
        return folder
    with lock_for(f"bigbench-{BIGBENCH_VERSION}-{digest[:16]}"):
        if _manifest_covers(folder, wanted):
            return folder
        if archive_path is None:
            archive_path = download_distribution(
                "bigbench", BIGBENCH_VERSION, sha256=BIGBENCH_SHA256
            )
        with staging_dir(folder) as tmp:
            started = time.perf_counter()
            found = _extract_archive(archive_path, wanted, tmp / "tasks")
            write_json_atomic(
                tmp / _MANIFEST,
                {
                    "archive": str(archive_path),
                    "sha256_prefix": digest[:16],
                    "requested": sorted(wanted),
                    "tasks": sorted(found),
                    "seconds": round(time.perf_counter() - started, 2),
                },
            )
    return folder


def parse_task(name: str, data: Mapping[str, Any]) -> Task:
    """Build a :class:`Task` from the parsed JSON of one ``task.json``."""
    raw_examples = data.get("examples")
    if not isinstance(raw_examples, list):
        raise BigBenchArchiveError(
            f"task {name!r} has no 'examples' list (a container task? name one of its subtasks)"
        )
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = data.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    choice_prefix = data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
    append_choices = bool(data.get("append_choices_to_input", True))

    examples: list[Example] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_examples):
        # BIG-bench drops exact duplicates, keeping the first; ids stay file positions.
        key = json.dumps(raw)
        if key in seen:
            continue
        seen.add(key)
        examples.append(
            _parse_example(
                name,
                index,
                raw,
                task_prefix=task_prefix,
                input_prefix=input_prefix,
                output_prefix=output_prefix,
                choice_prefix=choice_prefix,
                append_choices=append_choices,
            )
        )
    return Task(
        name=name,
        description=str(data.get("description", "")),
        examples=examples,
        task_prefix=task_prefix,
        input_prefix=input_prefix,
        output_prefix=output_prefix,
        choice_prefix=choice_prefix,
        append_choices_to_input=append_choices,
        metrics=list(data.get("metrics", [])),
        preferred_score=str(data.get("preferred_score", "")),
        keywords=list(data.get("keywords", [])),
        stop_string=data.get("stop_string"),
        output_regex=data.get("output_regex"),
        definition=task_prefix if name.startswith(_NATURAL_INSTRUCTIONS) else None,
        duplicates_dropped=len(raw_examples) - len(examples),
    )


def _parse_example(
    task: str,
    index: int,
    raw: Any,
    *,
    task_prefix: str,
    input_prefix: str,
    output_prefix: str,
    choice_prefix: str,
    append_choices: bool,
) -> Example:
    where = f"task {task!r}, example {index}"
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
        raise BigBenchArchiveError(f"{where}: expected an object with a string 'input'")
    if "target" not in raw and "target_scores" not in raw:
        raise BigBenchArchiveError(f"{where}: has neither 'target' nor 'target_scores'")
    text = raw["input"]
    scores: dict[str, float] | None = None
    if "target_scores" in raw:
        scores = {str(k): float(v) for k, v in raw["target_scores"].items()}
        if not scores:
            raise BigBenchArchiveError(f"{where}: 'target_scores' is empty")
        if append_choices:
            ordered = sorted(scores)
            shown = [ordered[i] for i in _choice_order(len(ordered))]
            text = text + choice_prefix + choice_prefix.join(shown)
    if "target" in raw:
        target = raw["target"]
        targets = [str(t) for t in target] if isinstance(target, list) else [str(target)]
    else:
        assert scores is not None
        best = max(scores.values())
        targets = [option for option, score in scores.items() if score == best]
    query = input_prefix + text + output_prefix
    return Example(
        task=task,
        index=index,
        input=raw["input"],
        prompt=task_prefix + query,
        query=query,
        targets=targets,
        target_scores=scores,
        metadata={k: v for k, v in raw.items() if k not in _EXAMPLE_FIELDS},
    )


@functools.lru_cache(maxsize=256)
def _choice_order(count: int) -> tuple[int, ...]:
    # default_format_fn permutes the sorted options with a fresh RandomState(42) per example,
    # so the order depends only on how many options there are.
    return tuple(int(i) for i in np.random.RandomState(seed=_CHOICE_SEED).permutation(count))


class _ProgressReader:
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, handle: IO[bytes], bar: tqdm) -> None:
        self._handle = handle
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._bar.update(len(chunk))
        return chunk

    def readable(self) -> bool:
        return True


def _extract_archive(archive: Path, wanted: frozenset[str], out: Path) -> set[str]:
    """One sequential pass over the tarball, copying the wanted tasks' ``task.json`` files."""
    found: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with (
            open(archive, "rb") as raw,
            tqdm(
                total=archive.stat().st_size,
                unit="B",
                unit_scale=True,
                desc=f"extracting BIG-bench tasks from {archive.name}",
            ) as bar,
            tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar,  # type: ignore[call-overload]
        ):
            for member in tar:
                name = _task_name_of(member)
                if name is None or name not in wanted:
                    continue
                source = tar.extractfile(member)
                if source is None:
                    continue
                target = out / name / "task.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                found.add(name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BigBenchArchiveError(
            f"{archive} is not a readable BIG-bench sdist ({type(exc).__name__}: {exc}); "
            f"delete it and fetch it again with `pip download --no-deps "
            f"bigbench=={BIGBENCH_VERSION}`, or pass archive= a good copy"
        ) from exc
    if not found:
        raise BigBenchArchiveError(
            f"{archive} holds no task.json of any train or dev task under "
            f"bigbench/benchmark_tasks/; is it the bigbench {BIGBENCH_VERSION} sdist?"
        )
    return found


def _task_name_of(member: tarfile.TarInfo) -> str | None:
    if not member.isfile() or not member.name.endswith("/task.json"):
        return None
    _, sep, rest = member.name.partition(_TASKS_DIR)
    if not sep:
        return None
    return rest.removesuffix("/task.json") or None


def _manifest_covers(folder: Path, wanted: frozenset[str]) -> bool:
    try:
        with open(folder / _MANIFEST, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return False
    return wanted.issubset(manifest.get("requested", ()))


@functools.lru_cache(maxsize=8)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only: a changed file is hashed again
    return sha256_file(Path(path))


def _archive_digest(path: Path) -> str:
    stat = path.stat()
    return _digest_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _allowed_names():
        raise ValueError(
            f"task {name!r} is not in capplug's BIG-bench train or dev lists "
            f"(capplug/data/bigbench_splits.json); other tasks are reserved for outside "
            f"evaluation. See task_names('train') and task_names('dev')"
        )


@functools.cache
def _splits() -> dict[str, Any]:
    text = resources.files("capplug.data").joinpath("bigbench_splits.json").read_text("utf-8")
    return json.loads(text)


@functools.cache
def _allowed_names() -> frozenset[str]:
    return frozenset(task_names("train")) | frozenset(task_names("dev"))
