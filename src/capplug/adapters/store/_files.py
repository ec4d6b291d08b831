"""The adapter store's files: file locks, last-used markers, setting a folder aside, and files
found intact before."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from filelock import FileLock

from capplug.adapters.store.records import (
    CORRUPT_DIR,
    LAST_USED_FILE,
    LOCKS_DIR,
    AdapterPaths,
    AdapterRecord,
    adapter_paths,
    checked_paths,
    file_signature,
    settled,
)
from capplug.errors import CorruptAdapterError

_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


def file_lock(path: Path) -> FileLock:
    # One object per path in a process: reentrant within a thread, exclusive across threads
    # (each thread holds its own descriptor) and across processes.
    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = FileLock(str(path), poll_interval=0.01)
        return lock


def creation_lock(root: Path, digest: str) -> FileLock:
    """The lock held while making the adapter for an instruction hash (striped 256 ways)."""
    return file_lock(root / LOCKS_DIR / f"create-{digest[:2]}.lock")


def mark_used(root: Path, adapter_id: str) -> None:
    """Set the adapter's last-used time to now (the modification time of ``.last-used``)."""
    marker = root / adapter_id / LAST_USED_FILE
    with contextlib.suppress(OSError):
        marker.touch()
        now = time.time()
        os.utime(marker, (now, now))


def set_aside_folder(root: Path, adapter_id: str) -> Path:
    """Move an adapter's folder to ``<root>/.corrupt/``; returns where it went (or would have)."""
    folder = root / adapter_id
    target = root / CORRUPT_DIR / f"{adapter_id}-{int(time.time())}"
    if folder.exists():
        target.parent.mkdir(exist_ok=True)
        os.replace(folder, target)
    return target


class IntactFiles:
    """Adapters whose files one store object hashed and found intact: id -> (both sha256, the
    files' stat signature then). A hit whose files still have that signature is not hashed again.
    """

    def __init__(self) -> None:
        self._intact: dict[str, tuple[str, str, tuple[int, ...]]] = {}

    def check(self, record: AdapterRecord, *, use_cache: bool) -> AdapterPaths:
        """:func:`checked_paths`, or, with ``use_cache``, nothing hashed when this object found
        the same files intact before (same stat signature).

        Files found intact are remembered only once they were last written more than
        ``SETTLED_SECONDS`` ago: a write in the clock tick of that check could keep the
        modification time, a later one cannot.
        """
        signature = file_signature(record)
        cached = self._intact.get(record.id)
        if (
            use_cache
            and signature is not None
            and cached == (record.sha256, record.config_sha256, signature)
        ):
            return adapter_paths(record)
        try:
            paths = checked_paths(record)
        except CorruptAdapterError:
            self._intact.pop(record.id, None)
            raise
        if signature is not None and settled(signature):
            self._intact[record.id] = (record.sha256, record.config_sha256, signature)
        return paths

    def forget(self, adapter_id: str) -> None:
        self._intact.pop(adapter_id, None)
