"""BIG-bench 1.0.0's PyPI sdist as one more source of tasks, for those who have the archive.

One sequential pass over the 358 MB tarball copies the ``task.json`` of every ``train`` and
``dev`` task of ``bigbench_splits.json`` into the capplug cache, where a
:class:`capplug.data.pool.Pool` reads them like any BIG-bench folder (``--data
bigbench-1.0.0.tar.gz``). Tasks in neither list are reserved for outside evaluation and are
never extracted or read. Without an archive, the pinned sdist is fetched with ``pip download
--no-deps`` where the package registry still serves it.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import tarfile
import time
import zlib
from importlib import resources
from pathlib import Path
from typing import IO, Any

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

_TASKS_DIR = "/bigbench/benchmark_tasks/"
_MANIFEST = "manifest.json"


def sdist_splits() -> dict[str, str]:
    """Each sdist task capplug may read and its split (``bigbench_splits.json``); tasks in
    neither list are reserved for outside evaluation and are never extracted or read."""
    splits = _splits()
    named = {name: "train" for name in splits["train"]}
    for names in splits["dev"].values():
        named.update({name: "dev" for name in names})
    return named


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


@functools.cache
def _splits() -> dict[str, Any]:
    text = resources.files("capplug.data").joinpath("bigbench_splits.json").read_text("utf-8")
    return json.loads(text)


@functools.cache
def _allowed_names() -> frozenset[str]:
    return frozenset(sdist_splits())
