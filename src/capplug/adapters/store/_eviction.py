"""Removing adapters: deleting them (folder aside first, then the rows) and evicting the least
recently used beyond the store's limits."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from typing import TYPE_CHECKING

from capplug.adapters.store._index import StoreIndex
from capplug.adapters.store.records import AdapterRecord, records_from_rows

if TYPE_CHECKING:
    from chromadb.api.models.Collection import Collection

logger = logging.getLogger(__name__)


def delete_adapters(index: StoreIndex, collection: Collection, ids: list[str]) -> None:
    """Remove adapters (caller holds the write lock): folder aside first, then the rows."""
    trash = []
    for adapter_id in ids:
        folder = index.root / adapter_id
        if folder.exists():
            aside = index.root / f".trash-{adapter_id}-{secrets.token_hex(4)}"
            os.replace(folder, aside)
            trash.append(aside)
    collection.delete(ids=ids)
    index.vectors_changed()
    for aside in trash:
        shutil.rmtree(aside, ignore_errors=True)


def evict_beyond_limits(
    index: StoreIndex, max_adapters: int | None, max_bytes: int | None, *, protect: set[str]
) -> None:
    """Evict beyond the store's own limits, ``max_adapters`` and ``max_bytes`` (after an
    adapter was added), sparing ``protect``."""
    if max_adapters is not None or max_bytes is not None:
        evict(index, max_adapters, max_bytes, protect=protect, dry_run=False, sync=False)


def evict(
    index: StoreIndex,
    max_adapters: int | None,
    max_bytes: int | None,
    *,
    protect: set[str],
    dry_run: bool,
    sync: bool,
) -> list[AdapterRecord]:
    """Evict the least recently used adapters beyond the limits; with ``sync``, also copy
    last-used times into the index. Returns the evicted records, least recently used first."""
    with index.writing() as collection:
        records = records_from_rows(
            collection.get(include=["metadatas", "documents"]), index.root, index.base_model
        )
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
            delete_adapters(index, collection, [r.id for r in evicted])
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
