"""Checking a store against its index (:meth:`AdapterStore.verify`) and fixing what is found
(:meth:`AdapterStore.repair`): rows without files, files without rows, corrupt adapters,
leftovers of interrupted writes and duplicate adapters for one instruction."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from capplug._cache import sha256_file
from capplug.adapters.store._adding import pending_adds
from capplug.adapters.store._checks import ADAPTER_ID
from capplug.adapters.store._eviction import delete_adapters
from capplug.adapters.store._files import IntactFiles, set_aside_folder
from capplug.adapters.store._index import StoreIndex, index_metadata
from capplug.adapters.store.records import (
    ADDING_DIR,
    LOCKS_DIR,
    RECORD_FILE,
    STALE_STAGING_SECONDS,
    AdapterRecord,
    StoreReport,
    checked_paths,
    read_record_file,
    records_from_rows,
)
from capplug.errors import CorruptAdapterError
from capplug.models.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from chromadb.api.models.Collection import Collection

# staging_dir's ".<id>.<random>" and delete_adapters' ".trash-<id>-<random>"
_LEFTOVER = re.compile(r"^\.(?:[0-9a-f]{16}\.|trash-[0-9a-f]{16}-)")


def repair(index: StoreIndex, intact: IntactFiles, *, check_hashes: bool) -> StoreReport:
    """What :meth:`AdapterStore.repair` does (see there), under the store-wide lock; corrupt
    adapters are forgotten by ``intact``."""
    root = index.root
    with index.writing() as collection:
        report = survey(root, index.base_model, collection, check_hashes=check_hashes)
        if not report.ok:
            index.vectors_changed()
        if report.rows_without_files:
            collection.delete(ids=report.rows_without_files)
            report.actions += [f"dropped row {i} (no files)" for i in report.rows_without_files]
        for adapter_id in report.corrupt:
            collection.delete(ids=[adapter_id])
            moved = set_aside_folder(root, adapter_id)
            intact.forget(adapter_id)
            report.actions.append(f"set aside {adapter_id} (corrupt) -> {moved}")
        if report.duplicates:
            delete_adapters(index, collection, list(report.duplicates))
            report.actions += [
                f"removed {dup} (a duplicate of {kept} for the same instruction)"
                for dup, kept in report.duplicates.items()
            ]
        for adapter_id in report.files_without_rows:
            record = read_record_file(root / adapter_id)
            assert record is not None  # survey counts unreadable ones as corrupt
            collection.upsert(
                ids=[record.id],
                embeddings=[index.embed(record.instruction)],
                documents=[record.instruction],
                metadatas=[index_metadata(record)],
            )
            report.actions.append(f"indexed {adapter_id} again from {RECORD_FILE}")
        for name in report.stale_staging:
            shutil.rmtree(root / name, ignore_errors=True)
            report.actions.append(f"removed leftover {name}")
        # Every folder of this base model is indexed, set aside or gone now: the names of
        # interrupted creations have served their purpose.
        adding = root / LOCKS_DIR / ADDING_DIR
        for adapter_id in pending_adds(adding, index.name):
            (adding / adapter_id).unlink(missing_ok=True)
    return report


def survey(
    root: Path, base_model: str, collection: Collection, *, check_hashes: bool
) -> StoreReport:
    """What :meth:`AdapterStore.verify` finds in the store at ``root`` for ``base_model`` (the
    caller holds the write lock on its ``collection``)."""
    report = StoreReport()
    records = {
        r.id: r
        for r in records_from_rows(
            collection.get(include=["metadatas", "documents"]), root, base_model
        )
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
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith("."):
            # Only old ones: a young staging folder may be a write in progress elsewhere.
            if _LEFTOVER.match(entry.name) and now - entry.stat().st_mtime > STALE_STAGING_SECONDS:
                report.stale_staging.append(entry.name)
            continue
        if not ADAPTER_ID.fullmatch(entry.name) or entry.name in records:
            continue
        stored = read_record_file(entry)
        if stored is None:
            report.corrupt.append(entry.name)
        elif stored.base_model.casefold() != base_model.casefold():
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
    _find_duplicates(report, usable, check_hashes=check_hashes)
    return report


def _find_duplicates(
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
