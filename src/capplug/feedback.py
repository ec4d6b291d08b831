"""Feedback on selections: what was chosen, and what users judged of it, in one SQLite file.

Every surface that chooses among candidates can record the choice (:meth:`FeedbackStore.record`)
and hand its id back to the caller (``selection_id`` in the ``capplug`` metadata). A judgement of
that selection arrives later, in one of three forms:

- ``label``: how good one candidate is, in [0, 1] (by default the chosen one);
- ``preferred``: the index of the candidate that should have been chosen;
- ``reference``: the answer that was wanted (each candidate is then labelled by Rouge-L F).

:meth:`FeedbackStore.rows` turns judged selections into rows ``capplug adapt`` trains on, the
candidates that were not chosen included, one group per selection.

The store is one SQLite file (default: ``feedback.sqlite3`` in the capplug home) in WAL mode:
writers in many threads or processes wait for each other (up to ``timeout`` seconds) instead of
failing, and a committed write survives the writer being killed. Every write is one
transaction, so a failed or refused one changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from capplug.chat import Instruction, distinct, flatten_chat, task_text
from capplug.errors import DuplicateFeedbackError, FeedbackError, UnknownSelectionError

__all__ = [
    "DuplicateFeedbackError",
    "FeedbackError",
    "FeedbackStore",
    "Judgement",
    "UnknownSelectionError",
    "as_feedback_store",
    "check_watcher",
    "default_feedback_path",
    "judge_selection",
    "require_recording",
]

FILE_NAME = "feedback.sqlite3"
MAX_CANDIDATES = 256
MAX_TEXT_CHARS = 100_000
_ID_PREFIX = "sel_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS selections (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    surface TEXT NOT NULL,
    model TEXT,
    instruction TEXT NOT NULL,
    candidates TEXT NOT NULL,
    chosen INTEGER NOT NULL,
    scores TEXT,
    task TEXT
);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    selection_id TEXT NOT NULL REFERENCES selections(id),
    created REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('label', 'preferred', 'reference')),
    candidate INTEGER,
    label REAL,
    reference TEXT,
    source TEXT,
    fingerprint TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS judgements_by_selection ON judgements(selection_id);
"""

Kind = Literal["label", "preferred", "reference"]


@dataclass(frozen=True)
class Judgement:
    """One stored judgement of a selection."""

    id: int
    selection_id: str
    kind: Kind
    candidate: int | None
    """The candidate judged (``label``) or preferred (``preferred``); ``None`` for a reference."""
    label: float | None
    reference: str | None
    source: str | None
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_feedback_store(value: Any) -> FeedbackStore | None:
    """A store from ``True`` (the default file), a path, a store; ``None`` or ``False``: none."""
    if value is None or value is False:
        return None
    if value is True:
        return FeedbackStore()
    if isinstance(value, str | os.PathLike):
        return FeedbackStore(value)
    if not callable(getattr(value, "record", None)) or not callable(getattr(value, "add", None)):
        raise TypeError(
            f"feedback must be True, a path or a FeedbackStore; got {type(value).__name__}"
        )
    return value


def require_recording(feedback: FeedbackStore | None, *, owner: str) -> FeedbackStore:
    """``feedback``, or a ValueError saying that adapting as judgements arrive (``auto_adapt``)
    needs ``owner`` to record its selections."""
    if feedback is None:
        raise ValueError(
            f"auto_adapt needs {owner} to record selections (feedback=...): the judgements "
            "it adapts on are judgements of recorded selections"
        )
    return feedback


def check_watcher(value: Any, feedback: FeedbackStore | None, *, owner: str) -> Any:
    """``value`` (``None``, or an :class:`~capplug.training.auto_adapt.AutoAdapter`: its
    ``notify(selection_id)`` is called after each judgement ``owner`` stores) checked to watch
    ``feedback``, the store ``owner`` records its selections in.

    Raises:
        ValueError: ``owner`` records no selections, or ``value`` watches another store.
        TypeError: ``value`` is not an AutoAdapter.
    """
    if value is None:
        return None
    if not callable(getattr(value, "notify", None)) or not hasattr(value, "feedback"):
        raise TypeError(
            f"auto_adapt must be a capplug.training.auto_adapt.AutoAdapter or None; got {value!r}"
        )
    require_recording(feedback, owner=owner)
    if Path(value.feedback.path).resolve() != Path(feedback.path).resolve():
        raise ValueError(
            f"auto_adapt must watch the feedback store {owner} records in ({feedback.path}); "
            f"it watches {value.feedback.path}"
        )
    return value


def judge_selection(
    feedback: FeedbackStore | None,
    selection_id: str,
    *,
    owner: str,
    watcher: Any = None,
    **judgement: Any,
) -> Judgement:
    """Store a judgement of a selection ``owner`` recorded in ``feedback``
    (:meth:`FeedbackStore.add` takes ``judgement``), then tell ``watcher`` (an
    :class:`~capplug.training.auto_adapt.AutoAdapter`; it returns at once). What
    :meth:`capplug.Reranker.judge` and the LangChain handlers' ``judge`` do.

    Raises:
        ValueError: ``owner`` records no selections (``feedback`` is None).
        FeedbackError: as :meth:`FeedbackStore.add`; nothing is stored and nobody is told.
    """
    if feedback is None:
        raise ValueError(
            f"{owner} records no selections, so there is nothing to judge: give it "
            "feedback=True (or a path, or a capplug.feedback.FeedbackStore)"
        )
    stored = feedback.add(selection_id, **judgement)
    if watcher is not None:
        watcher.notify(selection_id)
    return stored


def default_feedback_path() -> Path:
    """``$CAPPLUG_FEEDBACK_DB``, else ``feedback.sqlite3`` in the capplug home."""
    configured = os.environ.get("CAPPLUG_FEEDBACK_DB")
    if configured:
        return Path(configured).expanduser()
    from capplug._cache import cache_home

    return cache_home() / FILE_NAME


class FeedbackStore:
    """Selections and their judgements in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 30.0):
        self.path = Path(path).expanduser() if path is not None else default_feedback_path()
        if self.path.is_dir():
            raise FeedbackError(f"feedback store {self.path} is a folder; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # its own transaction
        if not self._has_task_column():  # a store written before selections had a task
            with self._write() as db:
                if not self._has_task_column():  # another process may have just added it
                    db.execute("ALTER TABLE selections ADD COLUMN task TEXT")

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r})"

    # ------------------------------------------------------------------------------ writing

    def record(
        self,
        instruction: Instruction,
        candidates: Sequence[str],
        chosen: int,
        *,
        scores: Sequence[float] | None = None,
        surface: str = "python",
        model: str | None = None,
        task: str | None = None,
    ) -> str:
        """Store one selection; its id (``sel_`` and 24 hex digits). Its task is kept too, to
        group feedback by: ``task``, or by default :func:`capplug.chat.task_text` of the
        instruction (a chat's system message, else the whole text)."""
        text = _check_text(flatten_chat(instruction), "instruction")
        task = _check_text(task_text(instruction) if task is None else task, "task")
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise FeedbackError("candidates must be a list of strings")
        if not 0 < len(candidates) <= MAX_CANDIDATES:
            raise FeedbackError(f"candidates must hold 1 to {MAX_CANDIDATES} strings")
        texts = [_check_text(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
        _check_index(chosen, len(texts), "chosen")
        values = None
        if scores is not None:
            values = [float(s) for s in scores]
            if len(values) != len(texts) or not all(math.isfinite(v) for v in values):
                raise FeedbackError("scores must be one finite number per candidate")
        selection_id = _ID_PREFIX + secrets.token_hex(12)
        with self._write() as db:
            db.execute(
                "INSERT INTO selections (id, created, surface, model, instruction, candidates, "
                "chosen, scores, task) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    selection_id,
                    time.time(),
                    surface,
                    model,
                    text,
                    json.dumps(texts, ensure_ascii=False),
                    chosen,
                    None if values is None else json.dumps(values),
                    None if task == text else task,
                ),
            )
        return selection_id

    def add(
        self,
        selection_id: str,
        *,
        label: float | None = None,
        candidate: int | None = None,
        preferred: int | None = None,
        reference: str | None = None,
        source: str | None = None,
    ) -> Judgement:
        """Store one judgement of a recorded selection: exactly one of ``label`` (for
        ``candidate``, by default the chosen one), ``preferred`` or ``reference``.

        Raises:
            UnknownSelectionError: no selection has that id.
            DuplicateFeedbackError: the same judgement is already stored.
            FeedbackError: anything else wrong with it (the message names the field).
        """
        given = [
            k
            for k, v in (("label", label), ("preferred", preferred), ("reference", reference))
            if v is not None
        ]
        if len(given) != 1:
            raise FeedbackError(
                "give exactly one of 'label', 'preferred' or 'reference'"
                + (f"; got {' and '.join(given)}" if given else "")
            )
        kind: Kind = given[0]  # type: ignore[assignment]
        if candidate is not None and kind != "label":
            raise FeedbackError(
                "'candidate' goes with 'label' (which candidate it judges)", param="candidate"
            )
        if source is not None:
            source = _check_text(source, "source", limit=256)
        with self._write() as db:
            row = db.execute(
                "SELECT candidates, chosen FROM selections WHERE id = ?", (selection_id,)
            ).fetchone()
            if row is None:
                raise UnknownSelectionError(f"no selection {selection_id!r} is recorded")
            count, chosen = len(json.loads(row[0])), int(row[1])
            value: float | None = None
            if kind == "label":
                value = _check_label(label)
                candidate = chosen if candidate is None else candidate
                _check_index(candidate, count, "candidate")
            elif kind == "preferred":
                _check_index(preferred, count, "preferred")
                candidate = preferred
            else:
                reference = _check_text(reference, "reference")
            fingerprint = hashlib.sha256(
                json.dumps([selection_id, kind, candidate, value, reference, source]).encode()
            ).hexdigest()
            created = time.time()
            try:
                cursor = db.execute(
                    "INSERT INTO judgements (selection_id, created, kind, candidate, label, "
                    "reference, source, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (selection_id, created, kind, candidate, value, reference, source, fingerprint),
                )
            except sqlite3.IntegrityError as exc:
                if "fingerprint" not in str(exc):
                    raise
                raise DuplicateFeedbackError(
                    f"this {kind} judgement of {selection_id} is already stored"
                ) from None
        return Judgement(
            int(cursor.lastrowid or 0),
            selection_id,
            kind,
            candidate,
            value,
            reference,
            source,
            created,
        )

    # ------------------------------------------------------------------------------ reading

    def selection(self, selection_id: str) -> dict[str, Any]:
        """One recorded selection with its judgements."""
        with self._read() as db:
            row = db.execute(
                "SELECT id, created, surface, model, instruction, candidates, chosen, scores, "
                "task FROM selections WHERE id = ?",
                (selection_id,),
            ).fetchone()
            if row is None:
                raise UnknownSelectionError(f"no selection {selection_id!r} is recorded")
            judgements = self._judgements(db, selection_id)
        return {
            "id": row[0],
            "created": row[1],
            "surface": row[2],
            "model": row[3],
            "instruction": row[4],
            "candidates": json.loads(row[5]),
            "chosen": row[6],
            "scores": None if row[7] is None else json.loads(row[7]),
            "task": row[4] if row[8] is None else row[8],
            "judgements": [j.to_dict() for j in judgements],
        }

    def stats(self) -> dict[str, Any]:
        """Counts: selections, judged selections, judgements by kind, rows :meth:`rows` gives,
        and judged selections per task (the 50 tasks with most)."""
        with self._read() as db:
            selections = db.execute("SELECT COUNT(*) FROM selections").fetchone()[0]
            judged = db.execute("SELECT COUNT(DISTINCT selection_id) FROM judgements").fetchone()[0]
            kinds = dict(
                db.execute("SELECT kind, COUNT(*) FROM judgements GROUP BY kind").fetchall()
            )
            tasks = db.execute(
                "SELECT COALESCE(s.task, s.instruction), COUNT(DISTINCT j.selection_id) "
                "FROM judgements j JOIN selections s ON s.id = j.selection_id "
                "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50"
            ).fetchall()
        return {
            "path": str(self.path),
            "selections": selections,
            "judged_selections": judged,
            "judgements": {k: kinds.get(k, 0) for k in ("label", "preferred", "reference")},
            "rows": sum(1 for _ in self.rows()),
            "tasks": [{"task": task, "judged_selections": count} for task, count in tasks],
        }

    def judged_selections(self, task: str) -> int:
        """How many selections of ``task`` (a selection's task, else its instruction, as
        :meth:`selection` gives it) have at least one judgement."""
        return len(self._judged_ids(task))

    def rows(self, *, task: str | None = None) -> Iterator[dict[str, Any]]:
        """Training rows from the judged selections (of ``task`` only, when given: a
        selection's task, else its instruction), as ``capplug adapt`` reads them.

        Per selection (its id is the row's ``group``, so a held-out slice keeps it whole): a
        ``preferred`` judgement labels that candidate 1.0 and the other distinct candidates 0.0;
        a ``label`` labels its candidate; a ``reference`` gives every distinct candidate that
        reference (the label becomes Rouge-L F against it). The latest judgement of each kind
        and candidate wins.
        """
        for selection_id in self._judged_ids(task):
            yield from _selection_rows(self.selection(selection_id))

    def _judged_ids(self, task: str | None) -> list[str]:
        """The judged selections (of ``task``), in the order first judged: the same feedback
        gives the same rows."""
        where, params = "", ()
        if task is not None:
            where = (
                "JOIN selections s ON s.id = j.selection_id "
                "WHERE COALESCE(s.task, s.instruction) = ? "
            )
            params = (task,)
        with self._read() as db:
            return [
                r[0]
                for r in db.execute(
                    f"SELECT j.selection_id FROM judgements j {where}"
                    "GROUP BY j.selection_id ORDER BY MIN(j.id)",
                    params,
                )
            ]

    def export(self, path: str | os.PathLike[str]) -> int:
        """Write :meth:`rows` to ``path`` (``.jsonl`` or ``.parquet``); how many rows."""
        out = Path(path).expanduser()
        rows = list(self.rows())
        suffix = out.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise FeedbackError(f"export to a .jsonl or .parquet file; got {out.name!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
        try:
            if suffix == ".jsonl":
                with open(tmp, "w", encoding="utf-8") as handle:
                    for row in rows:
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(rows), tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return len(rows)

    # ------------------------------------------------------------------------------ internals

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        yield self._connection()

    def _has_task_column(self) -> bool:
        return any(
            row[1] == "task" for row in self._connection().execute("PRAGMA table_info(selections)")
        )

    @staticmethod
    def _judgements(db: sqlite3.Connection, selection_id: str) -> list[Judgement]:
        return [
            Judgement(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
            for r in db.execute(
                "SELECT id, selection_id, kind, candidate, label, reference, source, created "
                "FROM judgements WHERE selection_id = ? ORDER BY id",
                (selection_id,),
            )
        ]


def _selection_rows(selection: dict[str, Any]) -> Iterator[dict[str, Any]]:
    candidates: list[str] = selection["candidates"]
    unique, where = distinct(candidates)
    first_of = {j: where.index(j) for j in range(len(unique))}
    latest: dict[tuple[str, int | None], dict[str, Any]] = {}
    for judgement in selection["judgements"]:
        # One preferred candidate per selection (the latest); one label per candidate.
        key = None if judgement["kind"] == "preferred" else judgement["candidate"]
        latest[(judgement["kind"], key)] = judgement
    labels: dict[int, float] = {}
    references: list[str] = []
    for (kind, _), judgement in latest.items():
        if kind == "preferred":
            for j in range(len(unique)):
                labels.setdefault(first_of[j], 0.0)
            labels[first_of[where[judgement["candidate"]]]] = 1.0
        elif kind == "label":
            labels[first_of[where[judgement["candidate"]]]] = float(judgement["label"])
        else:
            references.append(judgement["reference"])
    base = {
        "instruction": selection["instruction"],
        "group": selection["id"],
        "source": "feedback",
        "task": selection["task"],
    }
    for index in sorted(labels):
        yield {**base, "response": candidates[index], "label": labels[index]}
    if references:
        for j in range(len(unique)):
            index = first_of[j]
            if index not in labels:
                yield {**base, "response": candidates[index], "reference": references}


def _check_text(value: Any, field: str, *, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise FeedbackError(f"{field} must be a string; got {type(value).__name__}", param=field)
    if len(value) > limit:
        raise FeedbackError(f"{field} is longer than {limit:,} characters", param=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FeedbackError(f"{field} is not valid Unicode text", param=field) from None
    return value


def _check_index(value: Any, count: int, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise FeedbackError(
            f"{field} must be a candidate index from 0 to {count - 1}; got {value!r}", param=field
        )


def _check_label(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FeedbackError(f"label must be a number in [0, 1]; got {value!r}", param="label")
    label = float(value)
    if not math.isfinite(label) or not 0.0 <= label <= 1.0:
        raise FeedbackError(f"label must be a number in [0, 1]; got {value!r}", param="label")
    return label
