"""Finding an adapter for an instruction: exact repeats by hash, then the nearest instructions;
a hit is handed out only after its files pass their sha256 and ``verify_hit`` accepts it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

from capplug.adapters.store._files import IntactFiles, set_aside_folder
from capplug.adapters.store._index import StoreIndex
from capplug.adapters.store.records import (
    CORRUPT_DIR,
    AdapterRecord,
    HitCheck,
    Match,
    checked_paths,
    records_from_rows,
)
from capplug.errors import CorruptAdapterError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Finder:
    """What finding a hit uses of the store: its index, the files it found intact, and its
    ``verify_hit`` (as set when the search starts)."""

    index: StoreIndex
    intact: IntactFiles
    verify_hit: HitCheck | None


def exact(index: StoreIndex, digest: str) -> list[AdapterRecord]:
    """The adapters for this normalised instruction's hash, newest first (no encoder run)."""
    with index.reading() as collection:
        known = index.known_hashes(collection)
        if known is not None and digest not in known:
            return []
        rows = collection.get(
            where={"instruction_hash": digest}, include=["metadatas", "documents"]
        )
    return sorted(
        records_from_rows(rows, index.root, index.base_model),
        key=lambda r: r.created,
        reverse=True,
    )


def nearest(
    index: StoreIndex, text: str, k: int, memo: dict[str, list[float]] | None = None
) -> list[Match]:
    """The ``k`` adapters whose instructions are nearest to ``text``, best first."""
    embedding = index.embed(text, memo)
    with index.reading() as collection:
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
    records = records_from_rows(rows, index.root, index.base_model)
    return [
        Match(record, similarity(distance))
        for record, distance in zip(records, distances, strict=True)
    ]


def find_hit(
    finder: Finder,
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
    for match in _candidates(finder, text, digest, memo):
        best = best_of(best, match.similarity)
        record = match.record
        if match.similarity < threshold or record.id in rejected or record.id in set_aside:
            continue
        try:
            finder.intact.check(record, use_cache=True)
        except CorruptAdapterError as exc:
            if _set_aside_broken(finder.index, finder.intact, record, exc):
                set_aside.append(record.id)
            continue
        except OSError as exc:  # unreadable now (permissions, I/O): skipped, not set aside
            logger.warning("adapter %s cannot be read (%s); not using it", record.id, exc)
            continue
        if finder.verify_hit is not None and not finder.verify_hit(match.record, text):
            rejected.append(match.record.id)
            continue
        return match, best
    return None, best


def no_generator_message(
    root: Path, best: float | None, threshold: float, set_aside: list[str]
) -> str:
    """Why a miss in the store at ``root`` cannot be answered: nothing similar enough, or only
    corrupt adapters, and no generator to make one."""
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
        f"{root / CORRUPT_DIR}; no other stored adapter is at least {threshold} similar "
        f"and the store has no generator to make a new one: import the adapter again "
        f"(import_folder() or `capplug store import`), or pass "
        f"generator=Hypernetwork.from_pretrained(REF).generate"
    )


def similarity(distance: float) -> float:
    # Cosine distance of unit vectors is 1 - cos, in [0, 2]; opposite meanings are just "0".
    return min(1.0, max(0.0, 1.0 - float(distance)))


def best_of(a: float | None, b: float | None) -> float | None:
    """The larger similarity; None only when both are."""
    if a is None:
        return b
    return a if b is None else max(a, b)


def _fmt(value: float | None) -> str:
    return "n/a (the store is empty)" if value is None else f"{value:.3f}"


def _candidates(
    finder: Finder, text: str, digest: str, memo: dict[str, list[float]]
) -> Iterator[Match]:
    """Exact repeats (newest first), then the nearest instructions; embeds only if needed."""
    for record in exact(finder.index, digest):
        yield Match(record, 1.0)
    # More neighbours when a check may refuse some.
    yield from nearest(finder.index, text, 8 if finder.verify_hit is not None else 3, memo)


def _set_aside_broken(
    index: StoreIndex, intact: IntactFiles, record: AdapterRecord, problem: Exception
) -> bool:
    """Drop a hit whose files are missing or fail their sha256 and move its folder to
    ``<root>/.corrupt/``, as :meth:`AdapterStore.repair` does.

    Looked at again under the store-wide lock: False (nothing done) when the row is gone
    already (another process did this) or the files now match.
    """
    with index.writing() as collection:
        rows = collection.get(ids=[record.id], include=["metadatas", "documents"])
        current = records_from_rows(rows, index.root, index.base_model)
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
        index.vectors_changed()
        moved = set_aside_folder(index.root, record.id)
    intact.forget(record.id)
    logger.warning(
        "adapter %s for %r is not used: %s; dropped from the index, %s",
        record.id,
        record.instruction[:80],
        problem,
        f"its folder moved to {moved}" if existed else "its folder is gone",
    )
    return True
