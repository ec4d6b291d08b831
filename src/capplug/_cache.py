"""capplug's on-disk cache: where it lives, locking, atomic writes, and fetching packages with pip."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from capplug.errors import PackageFetchError

_HASH_CHUNK = 1 << 20


def cache_home() -> Path:
    """The cache root: ``$CAPPLUG_HOME`` if set, else ``~/.cache/capplug``."""
    root = os.environ.get("CAPPLUG_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "capplug"
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_for(name: str) -> FileLock:
    """An inter-process lock for one cache entry (``name`` must be a safe file name)."""
    locks = cache_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.lock"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def process_umask() -> int:
    """The process's umask (read once: reading it means setting it, briefly)."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
        return _UMASK


def share_like_umask(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode an ordinary one would
    have under the umask (0644 / 0755 under 022), so that another user, a serving container
    say, can read what capplug writes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~process_umask())


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` that becomes ``final`` by one rename on success.

    On failure the partial folder is removed and ``final`` is untouched, so a crash or a
    concurrent reader never sees half a model.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    share_like_umask(tmp, directory=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    share_like_umask(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def manual_fetch_hint(package: str, version: str) -> str:
    return (
        f"fetch it by hand with `pip download --no-deps {package}=={version} -d DIR` on a machine "
        f"that reaches the registry, then set CAPPLUG_WHEELHOUSE=DIR"
    )


def download_distribution(package: str, version: str, *, sha256: str | None = None) -> Path:
    """Download one distribution file (wheel or sdist) with ``pip download --no-deps``.

    The file is kept under ``<cache>/downloads`` and reused; when ``sha256`` is given it is
    checked, and a mismatching file is deleted and refused. ``$CAPPLUG_WHEELHOUSE`` names a
    folder of files fetched by hand, searched before the registry.

    Raises:
        PackageFetchError: the registry is unreachable, the package is unknown, or the hash
            does not match. The message names the package and the command to fetch it by hand.
    """
    downloads = cache_home() / "downloads" / f"{_safe(package)}-{version}"
    with lock_for(f"download-{_safe(package)}-{version}"):
        existing = _single_file(downloads)
        if existing is not None and (sha256 is None or sha256_file(existing) == sha256):
            return existing
        if downloads.exists():
            shutil.rmtree(downloads)
        with staging_dir(downloads) as tmp:
            cmd = [
                *_pip_command(),
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                f"{package}=={version}",
                "-d",
                str(tmp),
            ]
            wheelhouse = os.environ.get("CAPPLUG_WHEELHOUSE")
            if wheelhouse:
                cmd += ["--find-links", wheelhouse]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                lines = [
                    ln
                    for ln in (result.stderr or result.stdout).strip().splitlines()
                    if "is ignored" not in ln
                ]
                reason = lines[-1] if lines else f"pip exited with {result.returncode}"
                raise PackageFetchError(
                    f"could not download {package}=={version}: {reason.strip()}; "
                    + manual_fetch_hint(package, version)
                )
            got = _single_file(tmp)
            if got is None:
                raise PackageFetchError(
                    f"pip download of {package}=={version} produced no single file in {tmp}"
                )
            if sha256 is not None:
                actual = sha256_file(got)
                if actual != sha256:
                    raise PackageFetchError(
                        f"{got.name} has sha256 {actual}, expected {sha256}: the download is corrupt "
                        f"or not the pinned release; " + manual_fetch_hint(package, version)
                    )
    result_file = _single_file(downloads)
    assert result_file is not None
    return result_file


def _pip_command() -> list[str]:
    # The running interpreter's pip honours the user's pip configuration (indexes, proxies).
    if shutil.which("pip") is None or _has_module_pip():
        return [sys.executable, "-m", "pip"]
    return ["pip"]


def _has_module_pip() -> bool:
    import importlib.util

    return importlib.util.find_spec("pip") is not None


def _single_file(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return files[0] if len(files) == 1 else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name.lower())
