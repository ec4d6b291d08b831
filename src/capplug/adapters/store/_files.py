"""The adapter store's files: file locks, last-used markers, setting a folder aside, files found
intact before, and reading one of an adapter's files safely."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from pathlib import Path

from filelock import FileLock

from capplug.adapters.store.records import (
    ADAPTER_FILES,
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
from capplug.errors import CorruptAdapterError, RefusedAdapterFileError, UnknownAdapterFileError
from capplug.models.adapter_folder import ADAPTER_WEIGHTS

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


def check_file_name(name: str) -> str:
    """One of an adapter's two files, else :class:`UnknownAdapterFileError`."""
    if name not in ADAPTER_FILES:
        raise UnknownAdapterFileError(
            f"adapters have two files, {' and '.join(ADAPTER_FILES)}; there is no other"
        )
    return name


def read_adapter_file(root: Path, record: AdapterRecord, name: str) -> bytes:
    """One of the adapter's files, read without following links and checked against the sha256
    the index recorded: what is returned is what was hashed, with no window for the file to
    change in between.

    Raises:
        RefusedAdapterFileError: the folder is not a real directory directly in the store, or the
            file is a link or not a regular file.
        CorruptAdapterError: the file is missing or does not match its sha256.
    """
    folder = root / record.id
    path = folder / name
    # The folder must be a real directory directly in the store, the file a regular file in
    # it: a link planted in the store does not make the store read anything else.
    if (
        folder.is_symlink()
        or not folder.is_dir()
        or folder.resolve().parent != root.resolve()
        or path.is_symlink()
    ):
        raise RefusedAdapterFileError(
            f"adapter {record.id}'s {name} is not a regular file in its own folder; "
            f"it is not served (`capplug store verify` checks the store)"
        )
    expected = record.sha256 if name == ADAPTER_WEIGHTS else record.config_sha256
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise CorruptAdapterError(f"{name} is missing; `capplug store verify --repair`") from exc
    except OSError as exc:  # ELOOP: a link swapped in after the check above
        raise RefusedAdapterFileError(
            f"adapter {record.id}'s {name} is not served: {exc.strerror}"
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise RefusedAdapterFileError(f"adapter {record.id}'s {name} is not a regular file")
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CorruptAdapterError(
            f"{name} does not match the sha256 the index recorded; "
            f"`capplug store verify --repair` sets it aside"
        )
    return data
