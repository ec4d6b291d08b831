""":class:`AdapterStore`: LoRA adapters for one base model, indexed in Chroma by the instruction
each serves (the module docs of :mod:`capplug.adapters.store` describe the layout and guarantees).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from capplug.adapters.store import _adding, _eviction, _lookup, _verify
from capplug.adapters.store._checks import (
    ADAPTER_ID,
    check_base,
    check_id,
    check_instruction,
    check_k,
    check_limit,
    check_name,
    check_source,
    check_threshold,
    is_name,
)
from capplug.adapters.store._files import (
    IntactFiles,
    check_file_name,
    creation_lock,
    mark_used,
    read_adapter_file,
)
from capplug.adapters.store._index import StoreIndex
from capplug.adapters.store.records import (
    DEFAULT_STORE,
    LOCKS_DIR,
    MAX_INSTRUCTION_CHARS,
    SIDES,
    AdapterCheck,
    AdapterPaths,
    AdapterRecord,
    Generator,
    HitCheck,
    Match,
    Result,
    Side,
    Source,
    StoreReport,
    instruction_hash,
    records_from_rows,
)
from capplug.errors import NoGeneratorError, UnknownAdapterError
from capplug.models.adapter_folder import (
    META_BASE_MODEL,
    AdapterFiles,
    canonical_model_name,
    read_adapter,
)

if TYPE_CHECKING:
    import torch
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from chromadb.api.types import EmbeddingFunction
    from peft import LoraConfig


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
        self.threshold = check_threshold(threshold, "threshold")
        self.max_adapters = check_limit(max_adapters, "max_adapters")
        self.max_bytes = check_limit(max_bytes, "max_bytes")
        self.max_instruction_chars: int = (
            check_limit(max_instruction_chars, "max_instruction_chars") or MAX_INSTRUCTION_CHARS
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
        # Adapters whose files this object hashed and found intact (a hit whose files are
        # unchanged since is not hashed again).
        self._intact = IntactFiles()
        self._index = StoreIndex(
            self.root,
            self.base_model,
            client=client,
            chroma_url=chroma_url,
            embedding_function=embedding_function,
        )
        self.name: str = self._index.name
        """The Chroma collection of this store's adapters."""

    @property
    def embedding_function(self) -> EmbeddingFunction[Any]:
        """Embeds instructions: the one given, or the collection's own (as persisted)."""
        return self._index.embedding_function

    @embedding_function.setter
    def embedding_function(self, value: EmbeddingFunction[Any]) -> None:
        self._index.embedding_function = value

    # ------------------------------------------------------------------------------ lookup

    def lookup(
        self, instruction: str, *, threshold: float | None = None, k: int = 3
    ) -> list[Match]:
        """The stored adapters whose instructions are at least ``threshold`` similar, best first.

        An exact repeat (same text after :func:`normalize_instruction`) returns its adapters
        with similarity 1.0 at once, newest first, without running the encoder. Files are not
        checked here (:meth:`get_or_create` and :meth:`files` check them).
        """
        text = check_instruction(instruction, self.max_instruction_chars)
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        k = check_k(k)
        exact = _lookup.exact(self._index, instruction_hash(text))
        if exact:
            return [Match(record, 1.0) for record in exact[:k]]
        return [m for m in _lookup.nearest(self._index, text, k) if m.similarity >= threshold]

    def generation(self) -> str | None:
        """A token that changes whenever adapters are added to or removed from the index, by
        any process (``None`` with a shared Chroma server, which keeps no such token): what a
        caller caching lookups compares."""
        return self._index.generation()

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
        text = check_instruction(instruction, self.max_instruction_chars)
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        digest = instruction_hash(text)
        rejected: list[str] = []
        set_aside: list[str] = []
        memo: dict[str, list[float]] = {}  # embed the text once, however many steps need it
        finder = _lookup.Finder(self._index, self._intact, self.verify_hit)
        find = _lookup.find_hit
        match, best = find(finder, text, digest, threshold, rejected, set_aside, memo)
        if match is None and _adding.finish_interrupted_adds(self._index):
            match, again = find(finder, text, digest, threshold, rejected, set_aside, memo)
            best = _lookup.best_of(best, again)
        if match is None:
            if self.generator is None:
                raise NoGeneratorError(
                    _lookup.no_generator_message(self.root, best, threshold, set_aside),
                    set_aside=tuple(set_aside),
                )
            with creation_lock(self.root, digest):
                # Another process may have made it while this one waited for the lock.
                match, again = find(finder, text, digest, threshold, rejected, set_aside, memo)
                best = _lookup.best_of(best, again)
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
        mark_used(self.root, match.record.id)
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
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AdapterRecord:
        """Store and index an adapter given as a peft state dict and its LoRA config.

        ``name``: a unique name to find it by too (see :meth:`rename`). ``metadata``: string
        facts kept in the safetensors header (a task scorer's kind and guard verdict, say).
        """
        text = check_instruction(instruction, self.max_instruction_chars)
        record = _adding.add_adapter(
            self._index,
            state_dict,
            config,
            text,
            source=check_source(source),
            hypernetwork_version=hypernetwork_version,
            header=metadata,
            name=None if name is None else check_name(name),
        )
        self._evict_beyond_limits(protect={record.id})
        return record

    def import_folder(
        self,
        folder: str | os.PathLike[str],
        instruction: str,
        *,
        source: Source = "imported",
        name: str | None = None,
    ) -> AdapterRecord:
        """Store and index a peft LoRA folder made for this base model.

        The folder is checked completely first (config, truncated or corrupt safetensors, ranks,
        target modules), so nothing is indexed from a broken one. ``name``: a unique name to
        find it by too (see :meth:`rename`); checked before the folder is read.

        Raises:
            WrongBaseModelError: the adapter says it was made for another base model.
            AdapterFileError: a missing, truncated or corrupt file.
            AdapterNameError: ``name`` is not a usable name.
            AdapterNameTakenError: another adapter has that name.
        """
        text = check_instruction(instruction, self.max_instruction_chars)
        source = check_source(source)
        name = None if name is None else check_name(name)
        if name is not None:
            with self._index.reading() as collection:
                _adding.refuse_taken_names(self.root, collection, [name])
        files = read_adapter(folder)
        recorded = files.metadata.get(META_BASE_MODEL) or files.config.base_model_name_or_path
        if recorded:
            check_base(str(recorded), self.base_model, where=str(folder))
        record = _adding.add_adapter(
            self._index,
            files.state_dict,
            files.config,
            text,
            source=source,
            hypernetwork_version=files.metadata.get("capplug_hypernetwork_version") or None,
            header=files.metadata,
            name=name,
        )
        self._evict_beyond_limits(protect={record.id})
        return record

    def add_in_place(
        self,
        records: Sequence[AdapterRecord],
        *,
        embeddings: Sequence[Sequence[float]] | None = None,
        batch_size: int = 500,
    ) -> list[AdapterRecord]:
        """Index many adapters at once whose peft files are already in their folders.

        For filling a store in bulk (a migration, a benchmark): each record describes an
        adapter whose folder ``<root>/<id>`` already holds its ``adapter_model.safetensors`` and
        ``adapter_config.json``, their sha256 and size in the record (``folder`` may be left
        out). The store writes each folder's record file and last-used time (the record's), then
        indexes the rows ``batch_size`` per index write, with ``embeddings`` (one vector per
        record, in the store's embedding space) or embedding the instructions itself. Unlike
        :meth:`put`, the files are not read or hashed here: :meth:`verify` checks them, and
        every load and hit hashes them before use. A process cut off midway leaves folders
        without rows, which :meth:`repair` indexes from their record files. Then evicts beyond
        the store's limits, as :meth:`put` does, sparing the adapters just added.

        Returns the records as indexed (with their folders).

        Raises:
            WrongBaseModelError: a record is for another base model.
            ValueError: a record with a malformed or repeated id, an id indexed already, an
                instruction that is not stripped or is longer than ``max_instruction_chars``,
                an ``instruction_hash`` that is not :func:`instruction_hash` of it, a folder
                other than ``<root>/<id>`` or without its files, an unknown source; or not one
                embedding per record.
        """
        added = _adding.add_in_place(
            self._index, records, embeddings, batch_size, self.max_instruction_chars
        )
        self._evict_beyond_limits(protect={r.id for r in added})
        return added

    # ------------------------------------------------------------------------------ reading

    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of one adapter.

        Raises:
            UnknownAdapterError: no such adapter for this base model.
        """
        adapter_id = check_id(adapter_id)
        with self._index.reading() as collection:
            rows = collection.get(ids=[adapter_id], include=["metadatas", "documents"])
        records = records_from_rows(rows, self.root, self.base_model)
        if not records:
            raise UnknownAdapterError(
                f"no adapter {adapter_id!r} in the store at {self.root} for {self.base_model}; "
                f"`capplug store list` shows the ids there are"
            )
        return records[0]

    def resolve(self, name_or_id: str) -> AdapterRecord:
        """The record of the adapter with this id, or with this name (ids and names never look
        alike: a name is never 16 hex characters).

        Raises:
            UnknownAdapterError: no adapter has this id or name (or it is neither).
        """
        if isinstance(name_or_id, str) and ADAPTER_ID.fullmatch(name_or_id):
            return self.get(name_or_id)
        if not is_name(name_or_id):
            raise UnknownAdapterError(
                f"{str(name_or_id)[:80]!r} is neither an adapter id (16 lowercase hex "
                f"characters) nor an adapter name; `capplug store list` shows them"
            )
        with self._index.reading() as collection:
            rows = collection.get(where={"name": name_or_id}, include=["metadatas", "documents"])
        records = records_from_rows(rows, self.root, self.base_model)
        if not records:
            raise UnknownAdapterError(
                f"no adapter named {name_or_id!r} in the store at {self.root} for "
                f"{self.base_model}, and it is not an adapter id (16 lowercase hex characters); "
                f"`capplug store list` shows the ids and names there are"
            )
        return max(records, key=lambda r: (r.created, r.id))

    def rename(self, adapter_id: str, name: str | None) -> AdapterRecord:
        """Give an adapter a unique name (None takes its name away); returns its new record.

        Kept in its record file and index row, so it outlives the process and a
        :meth:`repair`. The name may be its own already.

        Raises:
            UnknownAdapterError: no such adapter.
            AdapterNameError: ``name`` is not 1 to 64 letters, digits, ``.``, ``_`` or ``-``
                from a letter or digit, or looks like an id (16 hex characters).
            AdapterNameTakenError: another adapter has that name.
        """
        adapter_id = check_id(adapter_id)
        return _adding.rename(self._index, adapter_id, None if name is None else check_name(name))

    def set_check(self, adapter_id: str, check: AdapterCheck | None) -> AdapterRecord:
        """Keep the judged fallback's verdict on an adapter (None forgets it, so the adapter is
        checked again); returns its new record.

        Kept in its record file and index row, so every process sharing the store sees it and
        it outlives a :meth:`repair`.

        Raises:
            UnknownAdapterError: no such adapter.
        """
        adapter_id = check_id(adapter_id)
        if check is not None and not isinstance(check, AdapterCheck):
            raise TypeError(f"check must be an AdapterCheck or None; got {type(check).__name__}")
        return _adding.update_record(self._index, adapter_id, check=check)

    def pin(self, adapter_id: str, side: Side | None) -> AdapterRecord:
        """Use the adapter (``"adapter"``) or the bare base model (``"base"``) for this adapter's
        instruction whatever its check says; None unpins (the check decides again).

        Raises:
            UnknownAdapterError: no such adapter.
            ValueError: ``side`` is not one of those.
        """
        adapter_id = check_id(adapter_id)
        if side is not None and side not in SIDES:
            raise ValueError(f"side must be 'adapter', 'base' or None; got {side!r}")
        return _adding.update_record(self._index, adapter_id, pinned=side)

    def files(self, adapter_id: str) -> AdapterPaths:
        """The adapter's folder and files, after checking both against their recorded sha256.

        Raises:
            UnknownAdapterError: no such adapter.
            CorruptAdapterError: a file is missing or changed since it was stored.
        """
        record = self.get(adapter_id)
        paths = self._intact.check(record, use_cache=False)
        mark_used(self.root, record.id)
        return paths

    def read_file(self, adapter_id: str, name: str) -> bytes:
        """The bytes of one of the adapter's two peft files, ``adapter_model.safetensors`` or
        ``adapter_config.json``, read without following links and checked against the sha256
        the index recorded (what is returned is what was hashed). Marks the adapter used.

        Raises:
            UnknownAdapterFileError: ``name`` is not one of the two (checked first).
            UnknownAdapterError: no such adapter.
            RefusedAdapterFileError: the adapter's folder is not a real directory directly in
                the store, or the file is a link or not a regular file.
            CorruptAdapterError: the file is missing or does not match its sha256.
        """
        name = check_file_name(name)
        record = self.get(adapter_id)
        data = read_adapter_file(self.root, record, name)
        mark_used(self.root, record.id)
        return data

    def load(self, adapter_id: str) -> AdapterFiles:
        """The adapter's config and tensors, read after :meth:`files` checked them."""
        return read_adapter(self.files(adapter_id).folder)

    def list_adapters(
        self, *, order: Literal["last_used", "created"] = "last_used"
    ) -> list[AdapterRecord]:
        """Every adapter for this base model, most recent first."""
        if order not in ("last_used", "created"):
            raise ValueError(f"order must be 'last_used' or 'created'; got {order!r}")
        with self._index.reading() as collection:
            rows = collection.get(include=["metadatas", "documents"])
        records = records_from_rows(rows, self.root, self.base_model)
        return sorted(records, key=lambda r: (getattr(r, order), r.id), reverse=True)

    def __len__(self) -> int:
        with self._index.reading() as collection:
            return collection.count()

    @property
    def collection(self) -> Collection:
        """The Chroma collection (for inspection; write through the store)."""
        with self._index.reading() as collection:
            return collection

    # ------------------------------------------------------------------------------ upkeep

    def touch(self, adapter_id: str) -> AdapterRecord:
        """Mark an adapter as used now (least recently used adapters are evicted first)."""
        record = self.get(adapter_id)
        mark_used(self.root, record.id)
        return self.get(record.id)

    def remove(self, adapter_id: str) -> AdapterRecord:
        """Delete an adapter's files and index row.

        Raises:
            UnknownAdapterError: no such adapter.
        """
        record = self.get(adapter_id)
        with self._index.writing() as collection:
            _eviction.delete_adapters(self._index, collection, [record.id])
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
        max_adapters = check_limit(max_adapters, "max_adapters") or self.max_adapters
        max_bytes = check_limit(max_bytes, "max_bytes") or self.max_bytes
        return _eviction.evict(
            self._index, max_adapters, max_bytes, protect=set(), dry_run=dry_run, sync=True
        )

    def verify(self, *, check_hashes: bool = True) -> StoreReport:
        """Find index rows without files, files without rows, files that fail their sha256,
        leftovers of interrupted writes, and duplicate adapters for one instruction.

        With ``check_hashes=False`` only adapters that have duplicates are hashed (so that the
        one kept is intact).
        """
        with self._index.writing() as collection:
            return _verify.survey(self.root, self.base_model, collection, check_hashes=check_hashes)

    def repair(self, *, check_hashes: bool = True) -> StoreReport:
        """Fix what :meth:`verify` finds.

        Rows without files are dropped; corrupt adapters are dropped and their folders moved to
        ``<root>/.corrupt/`` (nothing is deleted that could still be looked at); duplicates
        (:attr:`StoreReport.duplicates`) are deleted, rows and folders, keeping one adapter of
        each interchangeable set; other folders without rows are indexed again from their record
        file when their files still match it; leftovers of interrupted writes are removed.
        """
        return _verify.repair(self._index, self._intact, check_hashes=check_hashes)

    def close(self) -> None:
        """Release this store's hold on a persistent index (other stores may share it)."""
        self._index.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._index.describe()
        return f"AdapterStore({str(self.root)!r}, base_model={self.base_model!r}, {where})"

    # ------------------------------------------------------------------------------ internals

    def _evict_beyond_limits(self, *, protect: set[str]) -> None:
        _eviction.evict_beyond_limits(
            self._index, self.max_adapters, self.max_bytes, protect=protect
        )

    def _generate(self, text: str, memo: dict[str, list[float]]) -> AdapterRecord:
        assert self.generator is not None
        state_dict, config = self.generator(text)
        return _adding.add_adapter(
            self._index,
            state_dict,
            config,
            text,
            source="generated",
            hypernetwork_version=self.hypernetwork_version,
            memo=memo,
        )
