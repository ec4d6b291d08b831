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
hypernetwork version, source, the normalised instruction's hash and the adapter's unique name
(``""`` for none; :meth:`AdapterStore.rename`, :meth:`AdapterStore.resolve`), and the judged
fallback's verdict (:class:`AdapterCheck` as JSON, ``""`` for none; :meth:`AdapterStore.set_check`)
and a person's pin (``"adapter"``, ``"base"`` or ``""``; :meth:`AdapterStore.pin`). The store computes every
embedding itself and hands Chroma vectors, so an exact repeat (same normalised text) is answered
from the hash alone, without running the encoder.

**Files.** An adapter is written into a staging folder, checked as peft would load it
(:func:`~capplug.models.adapter_folder.read_adapter`), renamed into place and indexed under the
store-wide lock; :meth:`AdapterStore.files` re-hashes both files against the index on every load,
and :meth:`AdapterStore.read_file` hashes the very bytes it hands out (read without following
links). A hit is checked before it is returned too: its files are hashed unless this store object
found them intact before and their size, modification and change times and inode are still the same
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

**Modules.** ``store``: :class:`AdapterStore`; ``records``: :class:`AdapterRecord`, the results
and reports, the layout names, record files and :func:`checked_paths`; ``_index``: the Chroma
collection and its cross-process refresh; ``_files``: file locks, last-used markers, folders set
aside, files found intact, reading an adapter's file safely; ``_adding``: writing and indexing
adapters (one, or many in place), interrupted creations; ``_lookup``: exact repeats, nearest
instructions, checking a hit; ``_verify``: verify and repair; ``_eviction``: deleting and
evicting; ``_checks``: argument checks.
"""

from capplug.adapters.store._checks import check_name
from capplug.adapters.store._index import chroma_settings, collection_name
from capplug.adapters.store.records import (
    ADAPTER_FILES,
    ADDING_DIR,
    COLLECTION_FILE,
    CORRUPT_DIR,
    DEFAULT_STORE,
    FORMAT,
    LAST_USED_FILE,
    LOCKS_DIR,
    MAX_INSTRUCTION_CHARS,
    RECORD_FILE,
    SETTLED_SECONDS,
    SIDES,
    SOURCES,
    STALE_STAGING_SECONDS,
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
    checked_paths,
    instruction_hash,
    normalize_instruction,
)
from capplug.adapters.store.store import AdapterStore
from capplug.errors import (
    AdapterNameError,
    AdapterNameTakenError,
    AdapterStoreError,
    CorruptAdapterError,
    NoGeneratorError,
    RefusedAdapterFileError,
    TruncationWarning,
    UnknownAdapterError,
    UnknownAdapterFileError,
)
from capplug.models.adapter_folder import WrongBaseModelError

__all__ = [
    "ADAPTER_FILES",
    "ADDING_DIR",
    "COLLECTION_FILE",
    "CORRUPT_DIR",
    "DEFAULT_STORE",
    "FORMAT",
    "LAST_USED_FILE",
    "LOCKS_DIR",
    "MAX_INSTRUCTION_CHARS",
    "RECORD_FILE",
    "SETTLED_SECONDS",
    "SIDES",
    "SOURCES",
    "STALE_STAGING_SECONDS",
    "AdapterCheck",
    "AdapterNameError",
    "AdapterNameTakenError",
    "AdapterPaths",
    "AdapterRecord",
    "AdapterStore",
    "AdapterStoreError",
    "CorruptAdapterError",
    "Generator",
    "HitCheck",
    "Match",
    "NoGeneratorError",
    "RefusedAdapterFileError",
    "Result",
    "Side",
    "Source",
    "StoreReport",
    "TruncationWarning",
    "UnknownAdapterError",
    "UnknownAdapterFileError",
    "WrongBaseModelError",
    "check_name",
    "checked_paths",
    "chroma_settings",
    "collection_name",
    "instruction_hash",
    "normalize_instruction",
]
