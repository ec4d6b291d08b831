"""A store of LoRA adapters for one base model, indexed in Chroma by the instruction each serves.

A similar instruction finds an existing adapter instead of making a new one::

    store = AdapterStore("adapters_store", base_model="smollm2-135m-instruct",
                         generator=Hypernetwork.from_pretrained().generate)
    result = store.get_or_create("Answer the question with yes or no.")
    result.hit, result.similarity, store.files(result.record.id).folder

Layout under ``root`` (several base models may share one root; each has its own collection)::

    index/                    Chroma's PersistentClient (absent with chroma_url=...)
    .locks/index.lock         store-wide lock around every index write
    .locks/index.generation   changes after every write that adds or removes vectors
    .locks/create-XX.lock     creation locks, striped by the normalised instruction's hash
    .locks/adding/<id>        an adapter being moved into place and indexed (left by a crash)
    <id>/adapter_model.safetensors, adapter_config.json   a standard peft folder
    <id>/capplug-adapter.json the record (what the index row says), so repair can re-index
    <id>/.last-used           its modification time is when the adapter was last used

**Index.** One Chroma collection per base model (named from a hash of the canonical base model
name), cosine space, embedded by :class:`SentenceEncoderEmbeddingFunction` (registered with
Chroma) or the ``embedding_function`` given. The document is the instruction; the metadata holds
base model, rank, target modules, sha256 of both files, size, created and last-used times,
hypernetwork version, source and the normalised instruction's hash. The store computes every
embedding itself and hands Chroma vectors, so an exact repeat (same normalised text) is answered
from the hash alone, without running the encoder.

**Files.** An adapter is written into a staging folder, checked as peft would load it
(:func:`~capplug.adapters.adapter_folder.read_adapter`), renamed into place and indexed under the
store-wide lock; :meth:`AdapterStore.files` re-hashes both files against the index on every load.
A hit is checked before it is returned too: its files are hashed unless this store object found
them intact before and their size, modification and change times and inode are still the same
(and they were last written more than two seconds before that check, so a write in the same clock
tick cannot go unseen). A hit whose files are missing or fail their sha256 is never handed out: it
is dropped from the index and its folder moved to ``<root>/.corrupt/`` (what
:meth:`AdapterStore.repair` does), then the next match is tried and, with a generator, a fresh
adapter is made (``Result.set_aside`` names it); without one, :class:`NoGeneratorError` says so.

**Interrupted creation.** Under the store-wide lock, a creation names its adapter in
``.locks/adding/`` before moving the folder into place and removes the name once the row is in
the index. A process killed in between leaves the name: the next miss in any process indexes that
folder (when its files still match its record) before deciding to make a new adapter, so asking
again after a crash finds the adapter the crash left instead of making a second one.
:meth:`AdapterStore.repair` finishes them too, and keeps one of adapters that are interchangeable
for the same instruction (see :attr:`StoreReport.duplicates`).

**Several processes.** Chroma's ``PersistentClient`` is not process-safe: each process keeps its
own in-memory HNSW index, so a long-lived process does not see vectors another process added
(``count()`` and ``get()`` read SQLite and do), and when two processes write, the one that
persists its HNSW index last silently drops the other's vectors (measured with chromadb 1.5.9:
4 writers x 400 adds under a shared lock lost 10 of 1,601 vectors; with the refresh below, none in
the same run). So with the default persistent index every write that adds or removes vectors
takes the store-wide file lock, first reopens the client if the generation file changed since
this process last looked (a fresh client loads the HNSW index from disk and replays the log),
then bumps the generation; a lookup reopens (under the lock) when the generation changed. Metadata
updates and reads need no reopen. Reopening costs ~60 ms at 10,000 adapters, paid once per
change made elsewhere. A process should not also open its own ``PersistentClient`` on
``<root>/index``: Chroma shares one system per path within a process, so the store could not
reopen it. With ``chroma_url`` (a shared ``chroma run`` server) the server is the one owner of
the index and no reopening is needed; the file locks still coordinate adapter files, which must
then live on a file system all the processes share (and whose ``flock`` works: local disks do,
some network file systems do not).

Creating the adapter for an instruction holds a creation lock for its hash and looks again after
acquiring it, so processes asking for the same instruction at once make one adapter: the others
wait and then hit. Different instructions create in parallel (the locks are striped 256 ways by
hash). Last-used times are kept as the modification time of ``.last-used`` (a hit costs a
``utime``, not a 45 ms index write) and copied into the index by :meth:`AdapterStore.gc`.

**Checking a hit.** ``verify_hit(record, instruction) -> bool`` is called on every hit before it
is returned, after its files passed their sha256 (for instance: answer a probe input with the
cached adapter and score the answer with the scorer); when it returns False the next match is
tried, then a fresh adapter is made. Its record lists the refused adapters (``Result.rejected``).
Whether this helps is still to measure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from filelock import FileLock

from capplug._cache import sha256_file, staging_dir, write_json_atomic
from capplug.adapters.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    META_BASE_MODEL,
    AdapterFiles,
    WrongBaseModelError,
    canonical_model_name,
    read_adapter,
    write_peft_folder,
)
from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
from capplug.errors import (
    AdapterStoreError,
    CorruptAdapterError,
    NoGeneratorError,
    TruncationWarning,
    UnknownAdapterError,
)

if TYPE_CHECKING:
    import torch
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from chromadb.api.types import EmbeddingFunction
    from peft import LoraConfig

__all__ = [
    "DEFAULT_STORE",
    "AdapterPaths",
    "AdapterRecord",
    "AdapterStore",
    "AdapterStoreError",
    "CorruptAdapterError",
    "Match",
    "NoGeneratorError",
    "Result",
    "Source",
    "StoreReport",
    "UnknownAdapterError",
    "collection_name",
    "instruction_hash",
    "normalize_instruction",
]

logger = logging.getLogger(__name__)

DEFAULT_STORE = "adapters_store"
RECORD_FILE = "capplug-adapter.json"
LAST_USED_FILE = ".last-used"
FORMAT = "capplug-adapter-store/1"
MAX_INSTRUCTION_CHARS = 4096
CORRUPT_DIR = ".corrupt"
COLLECTION_FILE = ".collection.json"
"""In a store folder indexed on a shared Chroma server: the name of its collection there."""
LOCKS_DIR = ".locks"
ADDING_DIR = "adding"
SETTLED_SECONDS = 2.0
"""Files last written longer ago than this may be trusted by their stat; younger ones are hashed."""
STALE_STAGING_SECONDS = 3600.0

Source = Literal["generated", "trained", "imported"]
SOURCES: tuple[str, ...] = ("generated", "trained", "imported")
Generator = Callable[[str], "tuple[Mapping[str, torch.Tensor], LoraConfig | Mapping[str, Any]]"]
HitCheck = Callable[["AdapterRecord", str], bool]

_ID = re.compile(r"^[0-9a-f]{16}$")
# staging_dir's ".<id>.<random>" and _delete's ".trash-<id>-<random>"
_LEFTOVER = re.compile(r"^\.(?:[0-9a-f]{16}\.|trash-[0-9a-f]{16}-)")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class AdapterRecord:
    """What the store knows about one adapter (its index row)."""

    id: str
    instruction: str
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    sha256: str
    """Of ``adapter_model.safetensors``."""
    config_sha256: str
    """Of ``adapter_config.json``."""
    size: int
    """Bytes of both files."""
    created: float
    """Unix time."""
    last_used: float
    """Unix time of the last hit, load or :meth:`AdapterStore.touch`."""
    source: Source
    instruction_hash: str
    hypernetwork_version: str | None = None
    folder: Path = field(default=Path(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the folder as a string)."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["folder"] = str(self.folder)
        return data


@dataclass(frozen=True)
class Match:
    """A stored adapter and how similar its instruction is to the one looked up, in [0, 1]."""

    record: AdapterRecord
    similarity: float


@dataclass(frozen=True)
class Result:
    """What :meth:`AdapterStore.get_or_create` gives back.

    ``similarity`` is the hit's similarity; on a miss, the best similarity seen (below the
    threshold, or refused by ``verify_hit``), or None when nothing was comparable.
    """

    record: AdapterRecord
    hit: bool
    similarity: float | None
    rejected: tuple[str, ...] = ()
    """Ids of hits that ``verify_hit`` refused."""
    set_aside: tuple[str, ...] = ()
    """Ids of hits whose files were missing or failed their sha256: dropped from the index, their
    folders moved to ``<root>/.corrupt/``."""


@dataclass(frozen=True)
class AdapterPaths:
    """The files of a stored adapter, checked against their sha256 just now."""

    id: str
    folder: Path
    weights: Path
    config: Path


@dataclass
class StoreReport:
    """What :meth:`AdapterStore.verify` found, and what :meth:`AdapterStore.repair` did."""

    adapters: int = 0
    """Index rows checked."""
    rows_without_files: list[str] = field(default_factory=list)
    files_without_rows: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    """Rows whose files do not match their sha256, and folders with no readable record."""
    stale_staging: list[str] = field(default_factory=list)
    """Leftovers of interrupted writes (staging and trash folders older than an hour)."""
    duplicates: dict[str, str] = field(default_factory=dict)
    """Adapters (indexed or not) interchangeable with another one kept for the same instruction,
    each mapped to the id kept: a creation cut off before indexing and made again, or the same
    adapter stored twice. Interchangeable: the same normalised instruction and either both
    generated by the same hypernetwork version, or the same tensors, metadata and config. The one
    kept is an indexed one before one without a row, then the newest (the one an exact repeat
    finds first). Different adapters put on purpose for one instruction are not duplicates."""
    actions: list[str] = field(default_factory=list)
    """What repair did, one line each."""

    @property
    def ok(self) -> bool:
        return not (
            self.rows_without_files
            or self.files_without_rows
            or self.corrupt
            or self.stale_staging
            or self.duplicates
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def normalize_instruction(text: str) -> str:
    """The form two instructions share when they are the same request: NFKC, one space, casefolded."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def instruction_hash(text: str) -> str:
    """sha256 of :func:`normalize_instruction`; equal hashes are exact repeats."""
    return hashlib.sha256(normalize_instruction(text).encode("utf-8")).hexdigest()


def collection_name(base_model: str) -> str:
    """The Chroma collection of a base model's adapters (from a hash of its canonical name)."""
    digest = hashlib.sha256(canonical_model_name(base_model).encode("utf-8")).hexdigest()
    return f"capplug-adapters-{digest[:16]}"


class AdapterStore:
    """LoRA adapters for one base model, found by the instruction they were made for.

    Args:
        root: the store folder (created if missing).
        base_model: the model every adapter here is for (a packaged name, Hugging Face id or
            folder; packaged names and ids of the same model are the same base).
        client: a Chroma client to use instead of the default ``PersistentClient`` under
            ``<root>/index`` (the store then does not reopen it; see the module docs).
        chroma_url: a shared Chroma server (``chroma run``), e.g. ``http://127.0.0.1:8000``.
        embedding_function: embeds instructions; default: the collection's own (as persisted),
            or the packaged MiniLM for a new collection.
        generator: ``generator(instruction) -> (peft state dict, LoraConfig or its dict)``, used
            by :meth:`get_or_create` on a miss (e.g. ``Hypernetwork.generate``).
        hypernetwork_version: recorded with every generated adapter.
        threshold: the least similarity, in [0, 1], that counts as a hit.
        max_adapters: evict the least recently used beyond this many (after each creation).
        max_bytes: evict the least recently used beyond this many bytes of adapter files.
        verify_hit: ``verify_hit(record, instruction) -> bool``, asked before a hit is returned;
            False makes the store try the next match, then make a fresh adapter.
        max_instruction_chars: longer instructions are cut to this, with a warning.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_STORE,
        *,
        base_model: str | os.PathLike[str],
        client: ClientAPI | None = None,
        chroma_url: str | None = None,
        embedding_function: EmbeddingFunction[Any] | None = None,
        generator: Generator | None = None,
        hypernetwork_version: str | None = None,
        threshold: float = 0.8,
        max_adapters: int | None = None,
        max_bytes: int | None = None,
        verify_hit: HitCheck | None = None,
        max_instruction_chars: int = MAX_INSTRUCTION_CHARS,
    ) -> None:
        if not isinstance(base_model, str | os.PathLike) or not str(os.fspath(base_model)).strip():
            raise ValueError(
                "base_model must name the model the adapters are for, e.g. "
                f"'smollm2-135m-instruct'; got {base_model!r}"
            )
        if client is not None and chroma_url is not None:
            raise ValueError("give either client or chroma_url, not both")
        self.threshold = _check_threshold(threshold, "threshold")
        self.max_adapters = _check_limit(max_adapters, "max_adapters")
        self.max_bytes = _check_limit(max_bytes, "max_bytes")
        self.max_instruction_chars: int = (
            _check_limit(max_instruction_chars, "max_instruction_chars") or MAX_INSTRUCTION_CHARS
        )
        if generator is not None and not callable(generator):
            raise TypeError("generator must be callable: generator(instruction) -> (state, config)")
        if verify_hit is not None and not callable(verify_hit):
            raise TypeError("verify_hit must be callable: verify_hit(record, instruction) -> bool")
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / LOCKS_DIR).mkdir(exist_ok=True)
        self.base_model: str = canonical_model_name(base_model)
        self.generator = generator
        self.hypernetwork_version = hypernetwork_version
        self.verify_hit = verify_hit
        self.name = collection_name(self.base_model)
        self._index_lock = _file_lock(self.root / LOCKS_DIR / "index.lock")
        self._local: _LocalIndex | None = None
        if client is None and chroma_url is None:
            self._local = _LocalIndex.for_root(self.root, self._index_lock)
            self._client: ClientAPI | None = None
        else:
            self._client = client if client is not None else _http_client(chroma_url or "")
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
        # Adapters whose files this object hashed and found intact: id -> (both sha256, the files'
        # stat signature then). A hit whose files still have that signature is not hashed again.
        self._intact: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        self.embedding_function = self._open(embedding_function)

    # ------------------------------------------------------------------------------ lookup

    def lookup(
        self, instruction: str, *, threshold: float | None = None, k: int = 3
    ) -> list[Match]:
        """The stored adapters whose instructions are at least ``threshold`` similar, best first.

        An exact repeat (same text after :func:`normalize_instruction`) returns its adapters
        with similarity 1.0 at once, newest first, without running the encoder. Files are not
        checked here (:meth:`get_or_create` and :meth:`files` check them).
        """
        text = self._instruction(instruction)
        threshold = self.threshold if threshold is None else _check_threshold(threshold)
        k = _check_k(k)
        exact = self._exact(instruction_hash(text))
        if exact:
            return [Match(record, 1.0) for record in exact[:k]]
        return [m for m in self._nearest(text, k) if m.similarity >= threshold]

    def get_or_create(self, instruction: str, *, threshold: float | None = None) -> Result:
        """A stored adapter for ``instruction`` when one is similar enough, else a new one.

        A hit is returned only after its files passed their sha256 (a stat when this store
        object found the same files intact before; see the module docs). A hit whose files are
        missing or corrupt is dropped from the index, its folder moved to ``<root>/.corrupt/``
        (``Result.set_aside``), and the next match is tried, then a new adapter is made. Before
        making one, adapters whose creation was cut off between moving into place and indexing
        (a killed process) are indexed, so asking again after a crash finds that adapter.

        Raises:
            NoGeneratorError: a new adapter is needed and the store has no generator (its
                ``set_aside`` names the hits found corrupt on the way, and its message says so).
        """
        text = self._instruction(instruction)
        threshold = self.threshold if threshold is None else _check_threshold(threshold)
        digest = instruction_hash(text)
        rejected: list[str] = []
        set_aside: list[str] = []
        memo: dict[str, list[float]] = {}  # embed the text once, however many steps need it
        match, best = self._find_hit(text, digest, threshold, rejected, set_aside, memo)
        if match is None and self._finish_interrupted_adds():
            match, again = self._find_hit(text, digest, threshold, rejected, set_aside, memo)
            best = _max(best, again)
        if match is None:
            if self.generator is None:
                raise NoGeneratorError(
                    self._no_generator_message(best, threshold, set_aside),
                    set_aside=tuple(set_aside),
                )
            with self._creation_lock(digest):
                # Another process may have made it while this one waited for the lock.
                match, again = self._find_hit(text, digest, threshold, rejected, set_aside, memo)
                best = _max(best, again)
                created = None if match is not None else self._generate(text, memo)
            if created is not None:
                self._evict_beyond_limits(protect={created.id})
                return Result(
                    created,
                    hit=False,
                    similarity=best,
                    rejected=tuple(rejected),
                    set_aside=tuple(set_aside),
                )
        assert match is not None
        self._mark_used(match.record.id)
        return Result(
            match.record,
            hit=True,
            similarity=match.similarity,
            rejected=tuple(rejected),
            set_aside=tuple(set_aside),
        )

    # ------------------------------------------------------------------------------ adding

    def put(
        self,
        state_dict: Mapping[str, torch.Tensor],
        config: LoraConfig | Mapping[str, Any],
        *,
        instruction: str,
        source: Source = "trained",
        hypernetwork_version: str | None = None,
    ) -> AdapterRecord:
        """Store and index an adapter given as a peft state dict and its LoRA config."""
        text = self._instruction(instruction)
        record = self._add(
            state_dict,
            config,
            text,
            source=_check_source(source),
            hypernetwork_version=hypernetwork_version,
        )
        self._evict_beyond_limits(protect={record.id})
        return record

    def import_folder(
        self, folder: str | os.PathLike[str], instruction: str, *, source: Source = "imported"
    ) -> AdapterRecord:
        """Store and index a peft LoRA folder made for this base model.

        The folder is checked completely first (config, truncated or corrupt safetensors, ranks,
        target modules), so nothing is indexed from a broken one.

        Raises:
            WrongBaseModelError: the adapter says it was made for another base model.
            AdapterFileError: a missing, truncated or corrupt file.
        """
        text = self._instruction(instruction)
        source = _check_source(source)
        files = read_adapter(folder)
        recorded = files.metadata.get(META_BASE_MODEL) or files.config.base_model_name_or_path
        if recorded:
            self._check_base(str(recorded), where=str(folder))
        record = self._add(
            files.state_dict,
            files.config,
            text,
            source=source,
            hypernetwork_version=files.metadata.get("capplug_hypernetwork_version") or None,
            header=files.metadata,
        )
        self._evict_beyond_limits(protect={record.id})
        return record

    # ------------------------------------------------------------------------------ reading

    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of one adapter.

        Raises:
            UnknownAdapterError: no such adapter for this base model.
        """
        adapter_id = self._check_id(adapter_id)
        with self._reading() as collection:
            rows = collection.get(ids=[adapter_id], include=["metadatas", "documents"])
        records = self._records(rows)
        if not records:
            raise UnknownAdapterError(
                f"no adapter {adapter_id!r} in the store at {self.root} for {self.base_model}; "
                f"`capplug store list` shows the ids there are"
            )
        return records[0]

    def files(self, adapter_id: str) -> AdapterPaths:
        """The adapter's folder and files, after checking both against their recorded sha256.

        Raises:
            UnknownAdapterError: no such adapter.
            CorruptAdapterError: a file is missing or changed since it was stored.
        """
        record = self.get(adapter_id)
        paths = self._checked(record, use_cache=False)
        self._mark_used(record.id)
        return paths

    def load(self, adapter_id: str) -> AdapterFiles:
        """The adapter's config and tensors, read after :meth:`files` checked them."""
        return read_adapter(self.files(adapter_id).folder)

    def list_adapters(
        self, *, order: Literal["last_used", "created"] = "last_used"
    ) -> list[AdapterRecord]:
        """Every adapter for this base model, most recent first."""
        if order not in ("last_used", "created"):
            raise ValueError(f"order must be 'last_used' or 'created'; got {order!r}")
        with self._reading() as collection:
            records = self._records(collection.get(include=["metadatas", "documents"]))
        return sorted(records, key=lambda r: (getattr(r, order), r.id), reverse=True)

    def __len__(self) -> int:
        with self._reading() as collection:
            return collection.count()

    @property
    def collection(self) -> Collection:
        """The Chroma collection (for inspection; write through the store)."""
        with self._reading() as collection:
            return collection

    # ------------------------------------------------------------------------------ upkeep

    def touch(self, adapter_id: str) -> AdapterRecord:
        """Mark an adapter as used now (least recently used adapters are evicted first)."""
        record = self.get(adapter_id)
        self._mark_used(record.id)
        return self.get(record.id)

    def remove(self, adapter_id: str) -> AdapterRecord:
        """Delete an adapter's files and index row.

        Raises:
            UnknownAdapterError: no such adapter.
        """
        record = self.get(adapter_id)
        with self._writing() as collection:
            self._delete(collection, [record.id])
        return record

    def gc(
        self,
        *,
        max_adapters: int | None = None,
        max_bytes: int | None = None,
        dry_run: bool = False,
    ) -> list[AdapterRecord]:
        """Evict least recently used adapters beyond the limits (default: the store's).

        Also copies last-used times into the index. Returns the evicted (or, with ``dry_run``,
        the would-be evicted) records, least recently used first.
        """
        max_adapters = _check_limit(max_adapters, "max_adapters") or self.max_adapters
        max_bytes = _check_limit(max_bytes, "max_bytes") or self.max_bytes
        return self._evict(max_adapters, max_bytes, protect=set(), dry_run=dry_run, sync=True)

    def verify(self, *, check_hashes: bool = True) -> StoreReport:
        """Find index rows without files, files without rows, files that fail their sha256,
        leftovers of interrupted writes, and duplicate adapters for one instruction.

        With ``check_hashes=False`` only adapters that have duplicates are hashed (so that the
        one kept is intact).
        """
        with self._writing() as collection:
            return self._survey(collection, check_hashes=check_hashes)

    def repair(self, *, check_hashes: bool = True) -> StoreReport:
        """Fix what :meth:`verify` finds.

        Rows without files are dropped; corrupt adapters are dropped and their folders moved to
        ``<root>/.corrupt/`` (nothing is deleted that could still be looked at); duplicates
        (:attr:`StoreReport.duplicates`) are deleted, rows and folders, keeping one adapter of
        each interchangeable set; other folders without rows are indexed again from their record
        file when their files still match it; leftovers of interrupted writes are removed.
        """
        with self._writing() as collection:
            report = self._survey(collection, check_hashes=check_hashes)
            if not report.ok:
                self._vectors_changed()
            if report.rows_without_files:
                collection.delete(ids=report.rows_without_files)
                report.actions += [f"dropped row {i} (no files)" for i in report.rows_without_files]
            for adapter_id in report.corrupt:
                collection.delete(ids=[adapter_id])
                moved = self._set_aside(adapter_id)
                self._intact.pop(adapter_id, None)
                report.actions.append(f"set aside {adapter_id} (corrupt) -> {moved}")
            if report.duplicates:
                self._delete(collection, list(report.duplicates))
                report.actions += [
                    f"removed {dup} (a duplicate of {kept} for the same instruction)"
                    for dup, kept in report.duplicates.items()
                ]
            for adapter_id in report.files_without_rows:
                record = self._read_record_file(self.root / adapter_id)
                assert record is not None  # _survey counts unreadable ones as corrupt
                collection.upsert(
                    ids=[record.id],
                    embeddings=[self._embed(record.instruction)],
                    documents=[record.instruction],
                    metadatas=[_metadata(record)],
                )
                report.actions.append(f"indexed {adapter_id} again from {RECORD_FILE}")
            for name in report.stale_staging:
                shutil.rmtree(self.root / name, ignore_errors=True)
                report.actions.append(f"removed leftover {name}")
            # Every folder of this base model is indexed, set aside or gone now: the names of
            # interrupted creations have served their purpose.
            adding = self.root / LOCKS_DIR / ADDING_DIR
            for adapter_id in self._pending_adds(adding):
                (adding / adapter_id).unlink(missing_ok=True)
        return report

    def close(self) -> None:
        """Release this store's hold on a persistent index (other stores may share it)."""
        if self._local is not None:
            self._local.release()
            self._local = None

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"chroma at {self._client}" if self._client is not None else "persistent index"
        return f"AdapterStore({str(self.root)!r}, base_model={self.base_model!r}, {where})"

    # ------------------------------------------------------------------------------ internals

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
            with self._index_lock:
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
        with self._index_lock:
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

    def _chroma(self) -> ClientAPI:
        if self._local is not None:
            return self._local.client
        assert self._client is not None
        return self._client

    def _handle(self) -> Collection:
        epoch = self._local.epoch if self._local is not None else 0
        if self._collection is None or epoch != self._epoch:
            self._collection = self._chroma().get_collection(
                self.name, embedding_function=getattr(self, "embedding_function", None)
            )
            self._epoch = epoch
        return self._collection

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Collection]:
        if self._local is None:
            yield self._handle()
            return
        with self._local.lock:
            self._local.refresh()
            yield self._handle()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Collection]:
        """The collection, up to date, under the store-wide lock."""
        local = self._local
        with contextlib.ExitStack() as stack:
            if local is not None:
                stack.enter_context(local.lock)
            stack.enter_context(self._index_lock)
            if local is not None:
                local.refresh()
            yield self._handle()

    def _vectors_changed(self, added: str | None = None) -> None:
        """Tell other processes to reopen the index (call under :meth:`_writing`).

        ``added`` is the instruction hash of a row this write added: the in-memory hash set
        stays current by adding it; any other change makes the next lookup rebuild the set.
        """
        if self._local is None:
            return
        before = self._local.seen
        self._local.bump()
        if added is not None and self._hashes is not None and self._hashes_for == before:
            self._hashes.add(added)
            self._hashes_for = self._local.seen

    def _known_hashes(self, collection: Collection) -> set[str] | None:
        """The instruction hashes in a local index at its current generation (else ``None``)."""
        if self._local is None:
            return None
        if self._hashes is None or self._hashes_for != self._local.seen:
            rows = collection.get(include=["metadatas"])
            self._hashes = {
                str((meta or {}).get("instruction_hash", ""))
                for meta in rows.get("metadatas") or []
            }
            self._hashes_for = self._local.seen
        return self._hashes

    def _generate(self, text: str, memo: dict[str, list[float]]) -> AdapterRecord:
        assert self.generator is not None
        state_dict, config = self.generator(text)
        return self._add(
            state_dict,
            config,
            text,
            source="generated",
            hypernetwork_version=self.hypernetwork_version,
            memo=memo,
        )

    def _creation_lock(self, digest: str) -> FileLock:
        return _file_lock(self.root / LOCKS_DIR / f"create-{digest[:2]}.lock")

    def _instruction(self, instruction: Any) -> str:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string; got {type(instruction).__name__}")
        text = instruction.strip()
        if not text:
            raise ValueError(
                "instruction is empty; give the task's instruction, e.g. 'Answer the question "
                "with yes or no.'"
            )
        if len(text) > self.max_instruction_chars:
            warnings.warn(
                f"instruction has {len(text)} characters; the adapter store keeps the first "
                f"{self.max_instruction_chars} (max_instruction_chars) and matches on those",
                TruncationWarning,
                stacklevel=3,
            )
            text = text[: self.max_instruction_chars].rstrip()
        return text

    def _check_id(self, adapter_id: Any) -> str:
        # Exactly the id: an id with a newline or spaces around it (``ID%0A`` in a URL) is not
        # an id, however forgiving that would look on a command line (the CLI strips its own).
        if not isinstance(adapter_id, str) or not _ID.fullmatch(adapter_id):
            raise UnknownAdapterError(
                f"{adapter_id!r} is not an adapter id (16 lowercase hex characters, as "
                f"`capplug store list` shows)"
            )
        return adapter_id

    def _check_base(self, recorded: str, *, where: str) -> None:
        if canonical_model_name(recorded).casefold() != self.base_model.casefold():
            raise WrongBaseModelError(
                f"the adapter {where} was made for {canonical_model_name(recorded)}, but this "
                f"store holds adapters for {self.base_model}; open a store with "
                f"base_model={recorded!r} for it"
            )

    def _lora_config(self, config: Any) -> LoraConfig:
        from peft import LoraConfig, PeftConfig

        if isinstance(config, PeftConfig):
            if not isinstance(config, LoraConfig):
                raise TypeError(f"config must be a LoraConfig; got {type(config).__name__}")
            data = config.to_dict()
        elif isinstance(config, Mapping):
            data = dict(config)
        else:
            raise TypeError(
                f"config must be a peft LoraConfig or its dict; got {type(config).__name__}"
            )
        peft_type = str(data.pop("peft_type", "LORA")).split(".")[-1].upper()
        if peft_type != "LORA":
            raise ValueError(f"config describes a {peft_type} adapter; the store keeps LoRA ones")
        recorded = data.get("base_model_name_or_path")
        if recorded:
            self._check_base(str(recorded), where="config")
        data["base_model_name_or_path"] = self.base_model
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
        try:
            return LoraConfig(**data)
        except TypeError as exc:
            raise ValueError(f"config is not a LoraConfig peft accepts: {exc}") from exc

    def _add(
        self,
        state_dict: Mapping[str, Any],
        config: Any,
        text: str,
        *,
        source: Source,
        hypernetwork_version: str | None,
        header: Mapping[str, str] | None = None,
        memo: dict[str, list[float]] | None = None,
    ) -> AdapterRecord:
        """Write, check and index one adapter; the folder appears with its row, under the lock."""
        if not isinstance(state_dict, Mapping) or not state_dict:
            raise ValueError("state_dict must be a non-empty mapping of peft keys to tensors")
        lora = self._lora_config(config)
        digest = instruction_hash(text)
        metadata = {
            **{k: str(v) for k, v in (header or {}).items()},
            META_BASE_MODEL: self.base_model,
            "capplug_instruction_hash": digest,
        }
        if hypernetwork_version:
            metadata["capplug_hypernetwork_version"] = hypernetwork_version
        embedding = self._embed(text, memo)
        adapter_id = secrets.token_hex(8)
        final = self.root / adapter_id
        with contextlib.ExitStack() as stack:
            with staging_dir(final) as tmp:
                write_peft_folder(state_dict, lora, tmp, metadata=metadata)
                read_adapter(tmp)  # the same checks a load makes: pairs, ranks, targets, finite
                weights, config_file = tmp / ADAPTER_WEIGHTS, tmp / ADAPTER_CONFIG
                now = time.time()
                record = AdapterRecord(
                    id=adapter_id,
                    instruction=text,
                    base_model=self.base_model,
                    rank=int(lora.r),
                    target_modules=_targets(lora.target_modules),
                    sha256=sha256_file(weights),
                    config_sha256=sha256_file(config_file),
                    size=weights.stat().st_size + config_file.stat().st_size,
                    created=now,
                    last_used=now,
                    source=source,
                    instruction_hash=digest,
                    hypernetwork_version=hypernetwork_version or None,
                    folder=final,
                )
                write_json_atomic(tmp / RECORD_FILE, _record_file(record))
                (tmp / LAST_USED_FILE).touch()
                os.utime(tmp / LAST_USED_FILE, (now, now))
                collection = stack.enter_context(self._writing())
                # Named until its row is in the index (removed before the lock is released): a
                # process killed after the rename below leaves the name for the next miss.
                adding = self._begin_adding(adapter_id)
                stack.callback(adding.unlink, missing_ok=True)
            # Renamed into place; still under the index lock.
            added = False
            try:
                collection.add(
                    ids=[adapter_id],
                    embeddings=[embedding],
                    documents=[text],
                    metadatas=[_metadata(record)],
                )
                added = True
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            finally:
                self._vectors_changed(digest if added else None)
        logger.info("stored adapter %s (%s) for %r", adapter_id, source, text[:80])
        return record

    def _embed(self, text: str, memo: dict[str, list[float]] | None = None) -> list[float]:
        if memo is not None and text in memo:
            return memo[text]
        vector = [float(x) for x in self.embedding_function([text])[0]]
        if memo is not None:
            memo[text] = vector
        return vector

    def _exact(self, digest: str) -> list[AdapterRecord]:
        with self._reading() as collection:
            known = self._known_hashes(collection)
            if known is not None and digest not in known:
                return []
            rows = collection.get(
                where={"instruction_hash": digest}, include=["metadatas", "documents"]
            )
        return sorted(self._records(rows), key=lambda r: r.created, reverse=True)

    def _nearest(
        self, text: str, k: int, memo: dict[str, list[float]] | None = None
    ) -> list[Match]:
        embedding = self._embed(text, memo)
        with self._reading() as collection:
            found = collection.query(
                query_embeddings=[embedding],
                n_results=k,
                include=["metadatas", "documents", "distances"],
            )
        ids = found["ids"][0]
        if not ids:
            return []
        rows = {
            "ids": ids,
            "metadatas": (found.get("metadatas") or [[]])[0],
            "documents": (found.get("documents") or [[]])[0],
        }
        distances = (found.get("distances") or [[]])[0]
        records = self._records(rows)
        return [
            Match(record, _similarity(distance))
            for record, distance in zip(records, distances, strict=True)
        ]

    def _find_hit(
        self,
        text: str,
        digest: str,
        threshold: float,
        rejected: list[str],
        set_aside: list[str],
        memo: dict[str, list[float]],
    ) -> tuple[Match | None, float | None]:
        """The first acceptable hit, exact repeats first; and the best similarity seen.

        Acceptable: similar enough, its files intact (one that fails is set aside and added to
        ``set_aside``), and accepted by ``verify_hit``.
        """
        best: float | None = None
        for match in self._candidates(text, digest, memo):
            best = _max(best, match.similarity)
            record = match.record
            if match.similarity < threshold or record.id in rejected or record.id in set_aside:
                continue
            try:
                self._checked(record, use_cache=True)
            except CorruptAdapterError as exc:
                if self._set_aside_broken(record, exc):
                    set_aside.append(record.id)
                continue
            except OSError as exc:  # unreadable now (permissions, I/O): skipped, not set aside
                logger.warning("adapter %s cannot be read (%s); not using it", record.id, exc)
                continue
            if self.verify_hit is not None and not self.verify_hit(match.record, text):
                rejected.append(match.record.id)
                continue
            return match, best
        return None, best

    def _candidates(self, text: str, digest: str, memo: dict[str, list[float]]) -> Iterator[Match]:
        """Exact repeats (newest first), then the nearest instructions; embeds only if needed."""
        for record in self._exact(digest):
            yield Match(record, 1.0)
        # More neighbours when a check may refuse some.
        yield from self._nearest(text, 8 if self.verify_hit is not None else 3, memo)

    def _no_generator_message(
        self, best: float | None, threshold: float, set_aside: list[str]
    ) -> str:
        if not set_aside:
            return (
                f"no stored adapter for this instruction (best similarity {_fmt(best)}, "
                f"threshold {threshold}) and the store has no generator: pass "
                f"generator=Hypernetwork.from_pretrained(REF).generate, or add one with put() or "
                f"import_folder()"
            )
        which = ", ".join(set_aside)
        return (
            f"the stored adapter {which} for this instruction is corrupt (its files are missing "
            f"or fail their sha256), so it was dropped from the index and moved to "
            f"{self.root / CORRUPT_DIR}; no other stored adapter is at least {threshold} similar "
            f"and the store has no generator to make a new one: import the adapter again "
            f"(import_folder() or `capplug store import`), or pass "
            f"generator=Hypernetwork.from_pretrained(REF).generate"
        )

    def _checked(self, record: AdapterRecord, *, use_cache: bool) -> AdapterPaths:
        """:func:`checked_paths`, or, with ``use_cache``, nothing hashed when this object found the
        same files intact before (same stat signature).

        Files found intact are remembered only once they were last written more than
        ``SETTLED_SECONDS`` ago: a write in the clock tick of that check could keep the
        modification time, a later one cannot.
        """
        signature = _signature(record)
        cached = self._intact.get(record.id)
        if (
            use_cache
            and signature is not None
            and cached == (record.sha256, record.config_sha256, signature)
        ):
            return _paths(record)
        try:
            paths = checked_paths(record)
        except CorruptAdapterError:
            self._intact.pop(record.id, None)
            raise
        if signature is not None and _settled(signature):
            self._intact[record.id] = (record.sha256, record.config_sha256, signature)
        return paths

    def _set_aside_broken(self, record: AdapterRecord, problem: Exception) -> bool:
        """Drop a hit whose files are missing or fail their sha256 and move its folder to
        ``<root>/.corrupt/``, as :meth:`repair` does.

        Looked at again under the store-wide lock: False (nothing done) when the row is gone
        already (another process did this) or the files now match.
        """
        with self._writing() as collection:
            rows = collection.get(ids=[record.id], include=["metadatas", "documents"])
            current = self._records(rows)
            if not current:
                return False
            try:
                checked_paths(current[0])
            except CorruptAdapterError:
                pass
            except OSError:
                return False
            else:
                return False
            existed = record.folder.exists()
            collection.delete(ids=[record.id])
            self._vectors_changed()
            moved = self._set_aside(record.id)
        self._intact.pop(record.id, None)
        logger.warning(
            "adapter %s for %r is not used: %s; dropped from the index, %s",
            record.id,
            record.instruction[:80],
            problem,
            f"its folder moved to {moved}" if existed else "its folder is gone",
        )
        return True

    def _begin_adding(self, adapter_id: str) -> Path:
        """Name an adapter about to be moved into place and indexed (caller holds the lock)."""
        adding = self.root / LOCKS_DIR / ADDING_DIR
        adding.mkdir(exist_ok=True)
        marker = adding / adapter_id
        marker.write_text(self.name, encoding="utf-8")
        return marker

    def _pending_adds(self, adding: Path) -> list[str]:
        """Ids named in ``adding`` by creations of this base model's adapters."""
        try:
            names = sorted(e.name for e in os.scandir(adding) if _ID.fullmatch(e.name))
        except OSError:
            return []
        mine = []
        for name in names:
            with contextlib.suppress(OSError):
                if (adding / name).read_text(encoding="utf-8").strip() == self.name:
                    mine.append(name)
        return mine

    def _finish_interrupted_adds(self) -> list[str]:
        """Index this base model's adapters whose creation was cut off between moving the folder
        into place and indexing it; returns their ids.

        Costs one directory read when there are none. A name is also there while another
        process is between those two steps, holding the store-wide lock until it removes it: so
        the names are read again under that lock, where every one left is a crash's.
        """
        adding = self.root / LOCKS_DIR / ADDING_DIR
        if not self._pending_adds(adding):
            return []
        adopted: list[str] = []
        with self._writing() as collection:
            for adapter_id in self._pending_adds(adding):
                if self._adopt(collection, adapter_id):
                    adopted.append(adapter_id)
                (adding / adapter_id).unlink(missing_ok=True)
        return adopted

    def _adopt(self, collection: Collection, adapter_id: str) -> bool:
        """Index a folder a crash left without its row, when its files match its record and no
        adapter for its instruction was indexed since (else :meth:`repair` deals with it)."""
        if collection.get(ids=[adapter_id], include=[])["ids"]:
            return False  # indexed just before the process died
        record = self._read_record_file(self.root / adapter_id)
        if record is None:
            return False  # died before the rename, or the record is unreadable: verify says
        if collection.get(where={"instruction_hash": record.instruction_hash}, include=[])["ids"]:
            return False  # made again meanwhile: a duplicate, which repair removes
        try:
            checked_paths(record)
        except (CorruptAdapterError, OSError) as exc:
            logger.warning(
                "interrupted creation of adapter %s left it unusable: %s", adapter_id, exc
            )
            return False
        collection.add(
            ids=[record.id],
            embeddings=[self._embed(record.instruction)],
            documents=[record.instruction],
            metadatas=[_metadata(record)],
        )
        self._vectors_changed(record.instruction_hash)
        logger.warning(
            "indexed adapter %s for %r, whose creation was interrupted before it was indexed",
            record.id,
            record.instruction[:80],
        )
        return True

    def _mark_used(self, adapter_id: str) -> None:
        marker = self.root / adapter_id / LAST_USED_FILE
        with contextlib.suppress(OSError):
            marker.touch()
            now = time.time()
            os.utime(marker, (now, now))

    def _records(self, rows: Mapping[str, Any]) -> list[AdapterRecord]:
        ids = rows.get("ids") or []
        metadatas = rows.get("metadatas") or [None] * len(ids)
        documents = rows.get("documents") or [None] * len(ids)
        out = []
        for adapter_id, meta, document in zip(ids, metadatas, documents, strict=True):
            meta = meta or {}
            folder = self.root / adapter_id
            indexed_use = float(meta.get("last_used", 0.0))
            try:
                last_used = max(indexed_use, (folder / LAST_USED_FILE).stat().st_mtime)
            except OSError:
                last_used = indexed_use
            out.append(
                AdapterRecord(
                    id=adapter_id,
                    instruction=document or "",
                    base_model=str(meta.get("base_model", self.base_model)),
                    rank=int(meta.get("rank", 0)),
                    target_modules=tuple(
                        t for t in str(meta.get("target_modules", "")).split(",") if t
                    ),
                    sha256=str(meta.get("sha256", "")),
                    config_sha256=str(meta.get("config_sha256", "")),
                    size=int(meta.get("size", 0)),
                    created=float(meta.get("created", 0.0)),
                    last_used=last_used,
                    source=meta.get("source", "imported"),
                    instruction_hash=str(meta.get("instruction_hash", "")),
                    hypernetwork_version=meta.get("hypernetwork_version") or None,
                    folder=folder,
                )
            )
        return out

    def _delete(self, collection: Collection, ids: list[str]) -> None:
        """Remove adapters (caller holds the write lock): folder aside first, then the rows."""
        trash = []
        for adapter_id in ids:
            folder = self.root / adapter_id
            if folder.exists():
                aside = self.root / f".trash-{adapter_id}-{secrets.token_hex(4)}"
                os.replace(folder, aside)
                trash.append(aside)
        collection.delete(ids=ids)
        self._vectors_changed()
        for aside in trash:
            shutil.rmtree(aside, ignore_errors=True)

    def _evict_beyond_limits(self, *, protect: set[str]) -> None:
        if self.max_adapters is not None or self.max_bytes is not None:
            self._evict(
                self.max_adapters, self.max_bytes, protect=protect, dry_run=False, sync=False
            )

    def _evict(
        self,
        max_adapters: int | None,
        max_bytes: int | None,
        *,
        protect: set[str],
        dry_run: bool,
        sync: bool,
    ) -> list[AdapterRecord]:
        with self._writing() as collection:
            records = self._records(collection.get(include=["metadatas", "documents"]))
            records.sort(key=lambda r: (r.last_used, r.created))
            count, total = len(records), sum(r.size for r in records)
            evicted: list[AdapterRecord] = []
            for record in records:
                over_count = max_adapters is not None and count > max_adapters
                over_bytes = max_bytes is not None and total > max_bytes
                if not (over_count or over_bytes):
                    break
                if record.id in protect:
                    continue
                evicted.append(record)
                count -= 1
                total -= record.size
            if dry_run:
                return evicted
            if evicted:
                self._delete(collection, [r.id for r in evicted])
                logger.info("evicted %d least recently used adapters", len(evicted))
            if sync:
                gone = {r.id for r in evicted}
                stale = [r for r in records if r.id not in gone and r.last_used > 0]
                if stale:
                    rows = collection.get(ids=[r.id for r in stale], include=["metadatas"])
                    metas = dict(zip(rows["ids"], rows["metadatas"] or [], strict=True))
                    changed = [
                        r
                        for r in stale
                        if float((metas.get(r.id) or {}).get("last_used", 0)) < r.last_used
                    ]
                    if changed:
                        collection.update(
                            ids=[r.id for r in changed],
                            metadatas=[{"last_used": r.last_used} for r in changed],
                        )
        return evicted

    def _survey(self, collection: Collection, *, check_hashes: bool) -> StoreReport:
        report = StoreReport()
        records = {
            r.id: r for r in self._records(collection.get(include=["metadatas", "documents"]))
        }
        report.adapters = len(records)
        usable: list[tuple[AdapterRecord, bool]] = []  # (record, indexed): duplicates among them
        for record in records.values():
            weights, config = record.folder / ADAPTER_WEIGHTS, record.folder / ADAPTER_CONFIG
            if not (weights.is_file() and config.is_file()):
                report.rows_without_files.append(record.id)
            elif check_hashes and (
                sha256_file(weights) != record.sha256 or sha256_file(config) != record.config_sha256
            ):
                report.corrupt.append(record.id)
            else:
                usable.append((record, True))
        now = time.time()
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir():
                continue
            if entry.name.startswith("."):
                # Only old ones: a young staging folder may be a write in progress elsewhere.
                if (
                    _LEFTOVER.match(entry.name)
                    and now - entry.stat().st_mtime > STALE_STAGING_SECONDS
                ):
                    report.stale_staging.append(entry.name)
                continue
            if not _ID.fullmatch(entry.name) or entry.name in records:
                continue
            stored = self._read_record_file(entry)
            if stored is None:
                report.corrupt.append(entry.name)
            elif stored.base_model.casefold() != self.base_model.casefold():
                continue  # another base model's adapter sharing this root
            elif check_hashes and (
                not (entry / ADAPTER_WEIGHTS).is_file()
                or not (entry / ADAPTER_CONFIG).is_file()
                or sha256_file(entry / ADAPTER_WEIGHTS) != stored.sha256
                or sha256_file(entry / ADAPTER_CONFIG) != stored.config_sha256
            ):
                report.corrupt.append(entry.name)
            else:
                report.files_without_rows.append(entry.name)
                usable.append((stored, False))
        self._find_duplicates(report, usable, check_hashes=check_hashes)
        return report

    def _find_duplicates(
        self,
        report: StoreReport,
        usable: list[tuple[AdapterRecord, bool]],
        *,
        check_hashes: bool,
    ) -> None:
        """Fill ``report.duplicates``: of each interchangeable set, all but the one to keep.

        A folder without a row that is a duplicate moves from ``files_without_rows`` (to index)
        to ``duplicates`` (to remove). Without ``check_hashes`` the members of a set are hashed
        now, so that the one kept is intact.
        """
        sets: dict[tuple[str, ...], list[tuple[AdapterRecord, bool]]] = {}
        for record, indexed in usable:
            # Generated by one hypernetwork version: interchangeable. Put or imported: only with
            # the same contents (compared below, for the few that share an instruction).
            version = record.hypernetwork_version or ""
            kind = ("generated", version) if record.source == "generated" else ("stored",)
            sets.setdefault((record.instruction_hash, *kind), []).append((record, indexed))
        groups: list[list[tuple[AdapterRecord, bool]]] = []
        for key, members in sets.items():
            if len(members) < 2:
                continue
            if key[1] == "generated":
                groups.append(members)
                continue
            by_content: dict[tuple[str, ...], list[tuple[AdapterRecord, bool]]] = {}
            for member in members:
                by_content.setdefault(_contents(member[0]), []).append(member)
            groups += [same for same in by_content.values() if len(same) > 1]
        for members in groups:
            if not check_hashes:
                intact = []
                for record, indexed in members:
                    try:
                        checked_paths(record)
                    except (CorruptAdapterError, OSError):
                        report.corrupt.append(record.id)
                        if not indexed:
                            report.files_without_rows.remove(record.id)
                    else:
                        intact.append((record, indexed))
                members = intact
                if len(members) < 2:
                    continue
            # Indexed before unindexed, then the newest: what an exact repeat finds first.
            members.sort(key=lambda m: (m[1], m[0].created, m[0].id), reverse=True)
            kept = members[0][0].id
            for record, indexed in members[1:]:
                report.duplicates[record.id] = kept
                if not indexed:
                    report.files_without_rows.remove(record.id)

    def _read_record_file(self, folder: Path) -> AdapterRecord | None:
        try:
            data = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or data.get("id") != folder.name:
                return None
            return AdapterRecord(
                id=data["id"],
                instruction=data["instruction"],
                base_model=data["base_model"],
                rank=int(data["rank"]),
                target_modules=tuple(data["target_modules"]),
                sha256=data["sha256"],
                config_sha256=data["config_sha256"],
                size=int(data["size"]),
                created=float(data["created"]),
                last_used=float(data.get("last_used", data["created"])),
                source=data["source"],
                instruction_hash=data["instruction_hash"],
                hypernetwork_version=data.get("hypernetwork_version") or None,
                folder=folder,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _set_aside(self, adapter_id: str) -> Path:
        folder = self.root / adapter_id
        target = self.root / CORRUPT_DIR / f"{adapter_id}-{int(time.time())}"
        if folder.exists():
            target.parent.mkdir(exist_ok=True)
            os.replace(folder, target)
        return target


# ------------------------------------------------------------------------ persistent index


class _LocalIndex:
    """One ``PersistentClient`` per store root in a process, reopened when another process wrote.

    Store objects on the same root share it (Chroma itself shares one system per path), with one
    thread lock so a reopen never pulls the client from under a query in another thread.
    """

    _open: ClassVar[dict[Path, _LocalIndex]] = {}
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
    def for_root(cls, root: Path, file_lock: FileLock) -> _LocalIndex:
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


def chroma_settings() -> Any:
    """Chroma settings the store uses: no telemetry (nothing tries the network)."""
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


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


_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


def _file_lock(path: Path) -> FileLock:
    # One object per path in a process: reentrant within a thread, exclusive across threads
    # (each thread holds its own descriptor) and across processes.
    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = FileLock(str(path), poll_interval=0.01)
        return lock


# ------------------------------------------------------------------------------- helpers


def _metadata(record: AdapterRecord) -> dict[str, Any]:
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
    }


def _record_file(record: AdapterRecord) -> dict[str, Any]:
    data = record.to_dict()
    data.pop("folder")
    data.pop("last_used")
    return {"format": FORMAT, **data}


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


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(sorted(value or ()))


def checked_paths(record: AdapterRecord) -> AdapterPaths:
    """The record's folder and files, after checking both against their recorded sha256.

    Raises:
        CorruptAdapterError: a file is missing or changed since it was stored.
    """
    paths = _paths(record)
    for path, expected in ((paths.weights, record.sha256), (paths.config, record.config_sha256)):
        if not path.is_file():
            raise CorruptAdapterError(
                f"adapter {record.id}: {path} is missing; `capplug store verify --repair` "
                f"drops its index row"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise CorruptAdapterError(
                f"adapter {record.id}: {path.name} has sha256 {actual[:12]}..., the index "
                f"recorded {expected[:12]}...: the file changed or is corrupt; "
                f"`capplug store verify --repair` sets it aside"
            )
    return paths


def _paths(record: AdapterRecord) -> AdapterPaths:
    folder = record.folder
    return AdapterPaths(record.id, folder, folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG)


def _signature(record: AdapterRecord) -> tuple[int, ...] | None:
    """Size, modification and change times (ns), inode and device of both files; None when one
    cannot be looked at. Equal signatures: the same files, not written since."""
    out: list[int] = []
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        try:
            st = (record.folder / name).stat()
        except OSError:
            return None
        out += [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return tuple(out)


def _settled(signature: tuple[int, ...]) -> bool:
    """Both files were last modified more than ``SETTLED_SECONDS`` ago (see ``_signature``)."""
    newest = max(signature[1], signature[6])
    return time.time_ns() - newest > SETTLED_SECONDS * 1e9


def _contents(record: AdapterRecord) -> tuple[str, ...]:
    """What an adapter holds: its tensors, metadata and config, not how safetensors happened to
    order its header (it writes the metadata in hash-map order, so equal adapters stored twice
    differ in sha256). An unreadable file gives a key of its own."""
    try:
        with open(record.folder / ADAPTER_WEIGHTS, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except (OSError, ValueError, struct.error):
        return ("unreadable", record.id)
    return (digest.hexdigest(), record.config_sha256)


def _similarity(distance: float) -> float:
    # Cosine distance of unit vectors is 1 - cos, in [0, 2]; opposite meanings are just "0".
    return min(1.0, max(0.0, 1.0 - float(distance)))


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _fmt(value: float | None) -> str:
    return "n/a (the store is empty)" if value is None else f"{value:.3f}"


def _check_threshold(value: Any, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1]; got NaN")
    return float(value)


def _check_limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
    return value


def _check_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ValueError(f"k must be an integer from 1 to 1000; got {value!r}")
    return value


def _check_source(value: Any) -> Source:
    if value not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {value!r}")
    return value
