"""Adding adapters: writing, checking and indexing one (the folder appears with its row, under the
store-wide lock), indexing many whose folders are in place already, and finishing creations a
crash cut off between moving the folder into place and indexing it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capplug._cache import sha256_file, staging_dir, write_json_atomic
from capplug.adapters.store._checks import (
    ADAPTER_ID,
    check_base,
    check_name,
    check_source,
    lora_config,
    targets,
)
from capplug.adapters.store._index import StoreIndex, index_metadata
from capplug.adapters.store.records import (
    ADDING_DIR,
    LAST_USED_FILE,
    LOCKS_DIR,
    RECORD_FILE,
    AdapterRecord,
    Source,
    checked_paths,
    instruction_hash,
    read_record_file,
    record_file,
    records_from_rows,
)
from capplug.errors import AdapterNameTakenError, CorruptAdapterError, UnknownAdapterError
from capplug.models.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    META_BASE_MODEL,
    read_adapter,
    write_peft_folder,
)

if TYPE_CHECKING:
    from chromadb.api.models.Collection import Collection

logger = logging.getLogger(__name__)


def add_adapter(
    index: StoreIndex,
    state_dict: Mapping[str, Any],
    config: Any,
    text: str,
    *,
    source: Source,
    hypernetwork_version: str | None,
    header: Mapping[str, str] | None = None,
    memo: dict[str, list[float]] | None = None,
    name: str | None = None,
) -> AdapterRecord:
    """Write, check and index one adapter; the folder appears with its row, under the lock.

    A ``name`` is checked to be free before any work, and again under the lock."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("state_dict must be a non-empty mapping of peft keys to tensors")
    if name is not None:
        name = check_name(name)
        with index.reading() as collection:
            refuse_taken_names(index.root, collection, [name])
    lora = lora_config(config, index.base_model)
    digest = instruction_hash(text)
    metadata = {
        **{k: str(v) for k, v in (header or {}).items()},
        META_BASE_MODEL: index.base_model,
        "capplug_instruction_hash": digest,
    }
    if hypernetwork_version:
        metadata["capplug_hypernetwork_version"] = hypernetwork_version
    embedding = index.embed(text, memo)
    adapter_id = secrets.token_hex(8)
    final = index.root / adapter_id
    with contextlib.ExitStack() as stack:
        with staging_dir(final) as tmp:
            write_peft_folder(state_dict, lora, tmp, metadata=metadata)
            read_adapter(tmp)  # the same checks a load makes: pairs, ranks, targets, finite
            weights, config_file = tmp / ADAPTER_WEIGHTS, tmp / ADAPTER_CONFIG
            now = time.time()
            record = AdapterRecord(
                id=adapter_id,
                instruction=text,
                base_model=index.base_model,
                rank=int(lora.r),
                target_modules=targets(lora.target_modules),
                sha256=sha256_file(weights),
                config_sha256=sha256_file(config_file),
                size=weights.stat().st_size + config_file.stat().st_size,
                created=now,
                last_used=now,
                source=source,
                instruction_hash=digest,
                hypernetwork_version=hypernetwork_version or None,
                name=name,
                folder=final,
            )
            write_json_atomic(tmp / RECORD_FILE, record_file(record))
            (tmp / LAST_USED_FILE).touch()
            os.utime(tmp / LAST_USED_FILE, (now, now))
            collection = stack.enter_context(index.writing())
            if name is not None:  # taken meanwhile? (the staging folder goes with the error)
                refuse_taken_names(index.root, collection, [name])
            # Named until its row is in the index (removed before the lock is released): a
            # process killed after the rename below leaves the name for the next miss.
            adding = _begin_adding(index.root, index.name, adapter_id)
            stack.callback(adding.unlink, missing_ok=True)
        # Renamed into place; still under the index lock.
        added = False
        try:
            collection.add(
                ids=[adapter_id],
                embeddings=[embedding],
                documents=[text],
                metadatas=[index_metadata(record)],
            )
            added = True
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            index.vectors_changed(digest if added else None)
    logger.info("stored adapter %s (%s) for %r", adapter_id, source, text[:80])
    return record


def add_in_place(
    index: StoreIndex,
    records: Sequence[AdapterRecord],
    embeddings: Sequence[Sequence[float]] | None,
    batch_size: int,
    max_chars: int,
) -> list[AdapterRecord]:
    """What :meth:`AdapterStore.add_in_place` does (see there); ``max_chars``: the store's
    ``max_instruction_chars``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    records = list(records)
    if embeddings is not None and len(embeddings) != len(records):
        raise ValueError(
            f"embeddings must hold one vector per record; got {len(embeddings)} for "
            f"{len(records)} records"
        )
    checked = [_in_place(record, index.root, index.base_model, max_chars) for record in records]
    ids = [r.id for r in checked]
    if len(set(ids)) != len(ids):
        raise ValueError("records must have distinct ids; one is given twice")
    names = [r.name for r in checked if r.name is not None]
    if len(set(names)) != len(names):
        raise AdapterNameTakenError("records must have distinct names; one is given twice")
    for start in range(0, len(checked), batch_size):
        batch = checked[start : start + batch_size]
        for record in batch:
            write_json_atomic(record.folder / RECORD_FILE, record_file(record))
            (record.folder / LAST_USED_FILE).touch()
            os.utime(record.folder / LAST_USED_FILE, (record.last_used, record.last_used))
        if embeddings is not None:
            vectors = [_vector(v) for v in embeddings[start : start + batch_size]]
        else:
            vectors = [_vector(v) for v in index.embedding_function([r.instruction for r in batch])]
        with index.writing() as collection:
            known = collection.get(ids=[r.id for r in batch], include=[])["ids"]
            if known:
                raise ValueError(
                    f"adapter {known[0]} is indexed already; add_in_place adds new adapters"
                )
            batch_names = [r.name for r in batch if r.name is not None]
            refuse_taken_names(index.root, collection, batch_names)
            collection.add(
                ids=[r.id for r in batch],
                embeddings=vectors,
                documents=[r.instruction for r in batch],
                metadatas=[index_metadata(r) for r in batch],
            )
            index.vectors_changed()
    logger.info("indexed %d adapters already in place", len(checked))
    return checked


def refuse_taken_names(
    root: Path, collection: Collection, names: list[str], owner: str | None = None
) -> None:
    """Raise when an adapter other than ``owner`` has one of ``names`` (in the store at
    ``root``)."""
    if not names:
        return
    where: Any = {"name": names[0]} if len(names) == 1 else {"name": {"$in": names}}
    rows = collection.get(where=where, include=["metadatas"])
    for adapter_id, meta in zip(rows["ids"], rows.get("metadatas") or [], strict=False):
        if adapter_id != owner:
            taken = (meta or {}).get("name")
            raise AdapterNameTakenError(
                f"the name {taken!r} is taken by adapter {adapter_id} in the store at "
                f"{root}; pick another, or free it first (rename or remove {adapter_id})"
            )


def rename(index: StoreIndex, adapter_id: str, name: str | None) -> AdapterRecord:
    """What :meth:`AdapterStore.rename` does (see there)."""
    record = update_record(index, adapter_id, name=name)
    logger.info("adapter %s is named %r", adapter_id, name)
    return record


def update_record(index: StoreIndex, adapter_id: str, **changes: Any) -> AdapterRecord:
    """Change fields of an adapter's record (its name, its check): under the store-wide lock,
    the record file first, then the index row. A new ``name`` must be free."""
    with index.writing() as collection:
        rows = collection.get(ids=[adapter_id], include=["metadatas", "documents"])
        found = records_from_rows(rows, index.root, index.base_model)
        if not found:
            raise UnknownAdapterError(
                f"no adapter {adapter_id!r} in the store at {index.root} for {index.base_model}; "
                f"`capplug store list` shows the ids there are"
            )
        if changes.get("name") is not None:
            refuse_taken_names(index.root, collection, [changes["name"]], owner=adapter_id)
        record = dataclasses.replace(found[0], **changes)
        write_json_atomic(record.folder / RECORD_FILE, record_file(record))
        collection.update(ids=[adapter_id], metadatas=[index_metadata(record)])
    return record


def pending_adds(adding: Path, name: str) -> list[str]:
    """Ids named in ``adding`` by creations in the collection ``name``."""
    try:
        names = sorted(e.name for e in os.scandir(adding) if ADAPTER_ID.fullmatch(e.name))
    except OSError:
        return []
    mine = []
    for entry in names:
        with contextlib.suppress(OSError):
            if (adding / entry).read_text(encoding="utf-8").strip() == name:
                mine.append(entry)
    return mine


def finish_interrupted_adds(index: StoreIndex) -> list[str]:
    """Index this base model's adapters whose creation was cut off between moving the folder
    into place and indexing it; returns their ids.

    Costs one directory read when there are none. A name is also there while another
    process is between those two steps, holding the store-wide lock until it removes it: so
    the names are read again under that lock, where every one left is a crash's.
    """
    adding = index.root / LOCKS_DIR / ADDING_DIR
    if not pending_adds(adding, index.name):
        return []
    adopted: list[str] = []
    with index.writing() as collection:
        for adapter_id in pending_adds(adding, index.name):
            if _adopt(index, collection, adapter_id):
                adopted.append(adapter_id)
            (adding / adapter_id).unlink(missing_ok=True)
    return adopted


def _begin_adding(root: Path, name: str, adapter_id: str) -> Path:
    """Name an adapter about to be moved into place and indexed (caller holds the lock)."""
    adding = root / LOCKS_DIR / ADDING_DIR
    adding.mkdir(exist_ok=True)
    marker = adding / adapter_id
    marker.write_text(name, encoding="utf-8")
    return marker


def _adopt(index: StoreIndex, collection: Collection, adapter_id: str) -> bool:
    """Index a folder a crash left without its row, when its files match its record and no
    adapter for its instruction was indexed since (else :meth:`AdapterStore.repair` deals
    with it)."""
    if collection.get(ids=[adapter_id], include=[])["ids"]:
        return False  # indexed just before the process died
    record = read_record_file(index.root / adapter_id)
    if record is None:
        return False  # died before the rename, or the record is unreadable: verify says
    if collection.get(where={"instruction_hash": record.instruction_hash}, include=[])["ids"]:
        return False  # made again meanwhile: a duplicate, which repair removes
    try:
        checked_paths(record)
    except (CorruptAdapterError, OSError) as exc:
        logger.warning("interrupted creation of adapter %s left it unusable: %s", adapter_id, exc)
        return False
    collection.add(
        ids=[record.id],
        embeddings=[index.embed(record.instruction)],
        documents=[record.instruction],
        metadatas=[index_metadata(record)],
    )
    index.vectors_changed(record.instruction_hash)
    logger.warning(
        "indexed adapter %s for %r, whose creation was interrupted before it was indexed",
        record.id,
        record.instruction[:80],
    )
    return True


def _in_place(record: AdapterRecord, root: Path, base_model: str, max_chars: int) -> AdapterRecord:
    """The record as :func:`add_in_place` indexes it, after checking it fits the store at
    ``root`` (its base model, its instruction length)."""
    if not isinstance(record, AdapterRecord):
        raise TypeError(f"records must be AdapterRecord objects; got {type(record).__name__}")
    if not ADAPTER_ID.fullmatch(record.id):
        raise ValueError(f"{record.id!r} is not an adapter id (16 lowercase hex characters)")
    check_base(record.base_model, base_model, where=record.id)
    check_source(record.source)
    if record.name is not None:
        check_name(record.name)
    text = record.instruction
    if not isinstance(text, str) or not text or text != text.strip() or len(text) > max_chars:
        raise ValueError(
            f"adapter {record.id}'s instruction must be stripped text of 1 to "
            f"{max_chars} characters (max_instruction_chars)"
        )
    if record.instruction_hash != instruction_hash(text):
        raise ValueError(
            f"adapter {record.id}'s instruction_hash is not instruction_hash(instruction)"
        )
    folder = root / record.id
    if record.folder not in (Path(), folder):
        raise ValueError(f"adapter {record.id}'s folder must be {folder}; got {record.folder}")
    missing = [n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (folder / n).is_file()]
    if missing:
        raise ValueError(
            f"adapter {record.id} has no {' or '.join(missing)} in {folder}; put its peft "
            f"files there first"
        )
    return dataclasses.replace(record, base_model=base_model, folder=folder)


def _vector(value: Any) -> list[float]:
    tolist = getattr(value, "tolist", None)
    if tolist is not None:  # a numpy (or torch) row: Python floats, converted in C
        return list(tolist())
    return [float(x) for x in value]
