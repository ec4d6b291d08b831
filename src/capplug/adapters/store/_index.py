"""The adapter store's Chroma index: one collection per base model (per store folder on a shared
server), opened with its embedding function, kept current across processes, read and written
under the locks the module docs of :mod:`capplug.adapters.store` describe."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from filelock import FileLock

from capplug._cache import write_json_atomic
from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
from capplug.adapters.store._files import file_lock
from capplug.adapters.store.records import COLLECTION_FILE, FORMAT, LOCKS_DIR, AdapterRecord
from capplug.errors import AdapterStoreError
from capplug.models.adapter_folder import canonical_model_name

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from chromadb.api.types import EmbeddingFunction


def collection_name(base_model: str) -> str:
    """The Chroma collection of a base model's adapters (from a hash of its canonical name)."""
    digest = hashlib.sha256(canonical_model_name(base_model).encode("utf-8")).hexdigest()
    return f"capplug-adapters-{digest[:16]}"


def chroma_settings() -> Any:
    """Chroma settings the store uses: no telemetry (nothing tries the network)."""
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


def index_metadata(record: AdapterRecord) -> dict[str, Any]:
    """The metadata of an adapter's index row."""
    return {
        "base_model": record.base_model,
        "rank": record.rank,
        "target_modules": ",".join(record.target_modules),
        "sha256": record.sha256,
        "config_sha256": record.config_sha256,
        "size": record.size,
        "created": record.created,
        "last_used": record.last_used,
        "hypernetwork_version": record.hypernetwork_version or "",
        "source": record.source,
        "instruction_hash": record.instruction_hash,
        "name": record.name or "",
        "check": "" if record.check is None else json.dumps(record.check.to_dict()),
        "pinned": record.pinned or "",
    }


class StoreIndex:
    """One store's collection: its folder (``root``) and ``base_model``, its client (a local
    persistent index or a Chroma server), its name, its embedding function, and reads and writes
    that see what other processes wrote."""

    def __init__(
        self,
        root: Path,
        base_model: str,
        *,
        client: ClientAPI | None,
        chroma_url: str | None,
        embedding_function: EmbeddingFunction[Any] | None,
    ) -> None:
        self.root = root
        self.base_model = base_model
        self.name = collection_name(base_model)
        self.lock = file_lock(root / LOCKS_DIR / "index.lock")
        """The store-wide lock around every index write."""
        self.local: LocalIndex | None = None
        if client is None and chroma_url is None:
            self.local = LocalIndex.for_root(root, self.lock)
            self.client: ClientAPI | None = None
        else:
            self.client = client if client is not None else _http_client(chroma_url or "")
            # A shared server holds many stores' indexes: each store folder has its own
            # collection, so stores never see (or repair away) each other's rows.
            self.name = self._shared_collection_name()
        self._epoch = -1
        self._collection: Collection | None = None
        # Instruction hashes in a local index, valid for one generation token: a lookup whose
        # hash is not among them skips the metadata query (only local stores know when it
        # changed; a shared Chroma server is always asked).
        self._hashes: set[str] | None = None
        self._hashes_for: str | None = None
        self.embedding_function = self._open(embedding_function)

    def close(self) -> None:
        """Release this store's hold on a persistent index (other stores may share it)."""
        if self.local is not None:
            self.local.release()
            self.local = None

    def embed(self, text: str, memo: dict[str, list[float]] | None = None) -> list[float]:
        """The instruction's vector (from ``memo`` when it holds it, and kept there)."""
        if memo is not None and text in memo:
            return memo[text]
        vector = [float(x) for x in self.embedding_function([text])[0]]
        if memo is not None:
            memo[text] = vector
        return vector

    @contextlib.contextmanager
    def reading(self) -> Iterator[Collection]:
        """The collection, reopened first when another process changed its vectors."""
        if self.local is None:
            yield self._handle()
            return
        with self.local.lock:
            self.local.refresh()
            yield self._handle()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Collection]:
        """The collection, up to date, under the store-wide lock."""
        local = self.local
        with contextlib.ExitStack() as stack:
            if local is not None:
                stack.enter_context(local.lock)
            stack.enter_context(self.lock)
            if local is not None:
                local.refresh()
            yield self._handle()

    def vectors_changed(self, added: str | None = None) -> None:
        """Tell other processes to reopen the index (call under :meth:`writing`).

        ``added`` is the instruction hash of a row this write added: the in-memory hash set
        stays current by adding it; any other change makes the next lookup rebuild the set.
        """
        if self.local is None:
            return
        before = self.local.seen
        self.local.bump()
        if added is not None and self._hashes is not None and self._hashes_for == before:
            self._hashes.add(added)
            self._hashes_for = self.local.seen

    def generation(self) -> str | None:
        """The local index's generation token as written now (``None`` with a server)."""
        return None if self.local is None else self.local.read_generation()

    def known_hashes(self, collection: Collection) -> set[str] | None:
        """The instruction hashes in a local index at its current generation (else ``None``)."""
        if self.local is None:
            return None
        if self._hashes is None or self._hashes_for != self.local.seen:
            rows = collection.get(include=["metadatas"])
            self._hashes = {
                str((meta or {}).get("instruction_hash", ""))
                for meta in rows.get("metadatas") or []
            }
            self._hashes_for = self.local.seen
        return self._hashes

    def describe(self) -> str:
        """Where the index is, for the store's repr."""
        return f"chroma at {self.client}" if self.client is not None else "persistent index"

    def _chroma(self) -> ClientAPI:
        if self.local is not None:
            return self.local.client
        assert self.client is not None
        return self.client

    def _handle(self) -> Collection:
        epoch = self.local.epoch if self.local is not None else 0
        if self._collection is None or epoch != self._epoch:
            self._collection = self._chroma().get_collection(
                self.name, embedding_function=getattr(self, "embedding_function", None)
            )
            self._epoch = epoch
        return self._collection

    def _open(self, given: EmbeddingFunction[Any] | None) -> EmbeddingFunction[Any]:
        """Open (or create) this base model's collection; returns the embedding function."""
        from chromadb.errors import NotFoundError

        client = self._chroma()
        try:
            existing = client.get_collection(self.name)
        except NotFoundError:
            existing = None
        except ValueError as exc:  # a persisted embedding function this process cannot build
            raise AdapterStoreError(
                f"the adapter index {self.name} in {self.root} was made with an embedding "
                f"function this process does not know ({exc}); import the module that registers "
                f"it, or pass embedding_function="
            ) from exc
        if existing is not None:
            persisted = existing.configuration.get("embedding_function")
            ef = given if given is not None else persisted
            if ef is None:
                raise AdapterStoreError(
                    f"the adapter index {self.name} records no embedding function; pass "
                    f"embedding_function= (the one it was built with)"
                )
            recorded = (existing.metadata or {}).get("embedder")
            if recorded is not None and recorded != _embedder_identity(ef):
                raise AdapterStoreError(
                    f"the adapters for {self.base_model} in {self.root} were indexed with "
                    f"{recorded}, not {_embedder_identity(ef)}: their vectors are in another "
                    f"embedding space; open the store with that embedding function (or none, to "
                    f"use it), or use another store folder"
                )
        else:
            ef = given if given is not None else SentenceEncoderEmbeddingFunction()
            with self.lock:
                client.get_or_create_collection(
                    self.name,
                    embedding_function=ef,
                    configuration={"hnsw": {"space": "cosine"}},
                    metadata={
                        "base_model": self.base_model,
                        "format": FORMAT,
                        "embedder": _embedder_identity(ef),
                    },
                )
        return ef

    def _shared_collection_name(self) -> str:
        """This store folder's collection on a shared Chroma server, chosen once and kept in
        ``<root>/.collection.json``: ``<base model's name>-<random id>``. A folder that already used
        the base model's shared collection (stores made before each had its own) keeps it."""
        from chromadb.errors import NotFoundError

        marker = self.root / COLLECTION_FILE
        with self.lock:
            if marker.is_file():
                try:
                    return str(json.loads(marker.read_text(encoding="utf-8"))["collection"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise AdapterStoreError(
                        f"{marker} is unreadable ({exc}); it names this store's collection on "
                        f"the Chroma server: restore it, or delete it to start a new index"
                    ) from exc
            legacy, name = self.name, f"{self.name}-{secrets.token_hex(6)}"
            try:
                rows = self._chroma().get_collection(legacy).get(include=[])["ids"]
            except NotFoundError:
                rows = []
            if any((self.root / row).is_dir() for row in rows):
                name = legacy  # this folder's adapters are indexed there already
            write_json_atomic(marker, {"collection": name, "base_model": self.base_model})
            return name


# ------------------------------------------------------------------------ persistent index


class LocalIndex:
    """One ``PersistentClient`` per store root in a process, reopened when another process wrote.

    Store objects on the same root share it (Chroma itself shares one system per path), with one
    thread lock so a reopen never pulls the client from under a query in another thread.
    """

    _open: ClassVar[dict[Path, LocalIndex]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: Path, file_lock: FileLock) -> None:
        self.root = root
        self.path = root / "index"
        self.generation_file = root / LOCKS_DIR / "index.generation"
        self.file_lock = file_lock
        self.lock = threading.RLock()
        self.users = 0
        self.epoch = 0
        with file_lock:
            self.client = self._new_client()
            self.seen = self._generation()

    @classmethod
    def for_root(cls, root: Path, file_lock: FileLock) -> LocalIndex:
        with cls._registry_lock:
            index = cls._open.get(root)
            if index is None:
                index = cls._open[root] = cls(root, file_lock)
            index.users += 1
            return index

    def release(self) -> None:
        with self._registry_lock:
            self.users -= 1
            if self.users <= 0 and self._open.get(self.root) is self:
                del self._open[self.root]
                with self.lock:
                    self.client.close()

    def _new_client(self) -> ClientAPI:
        import chromadb

        return chromadb.PersistentClient(path=str(self.path), settings=chroma_settings())

    def read_generation(self) -> str:
        """The generation token as the file holds it now."""
        return self._generation()

    def _generation(self) -> str:
        try:
            return self.generation_file.read_text(encoding="utf-8")
        except OSError:
            return ""

    def refresh(self) -> None:
        """Reopen when another process changed the vectors since this one last looked.

        The caller holds ``self.lock``; the file lock is taken here (it is reentrant).
        """
        if self._generation() == self.seen:
            return
        with self.file_lock:
            current = self._generation()
            if current == self.seen:
                return
            self.client.close()
            self.client = self._new_client()
            self.epoch += 1
            self.seen = current

    def bump(self) -> None:
        """Record a write that added or removed vectors (caller holds both locks)."""
        token = secrets.token_hex(8)
        tmp = self.generation_file.with_name(f".{self.generation_file.name}.{token}")
        tmp.write_text(token, encoding="utf-8")
        os.replace(tmp, self.generation_file)
        self.seen = token


def _http_client(url: str) -> ClientAPI:
    from urllib.parse import urlsplit

    import chromadb

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"chroma_url must be an http(s) URL such as http://127.0.0.1:8000; got {url!r}"
        )
    ssl = parts.scheme == "https"
    return chromadb.HttpClient(
        host=parts.hostname,
        port=parts.port or (443 if ssl else 8000),
        ssl=ssl,
        settings=chroma_settings(),
    )


def _embedder_identity(ef: Any) -> str:
    try:
        config = dict(ef.get_config())
    except Exception:
        config = {}
    # Where and how fast it runs does not move the vectors; which model it is does.
    config = {k: v for k, v in config.items() if k not in ("device", "batch_size", "precision")}
    if isinstance(config.get("model"), str):
        config["model"] = canonical_model_name(config["model"])
    return json.dumps({"name": ef.name(), **config}, sort_keys=True, default=str)
