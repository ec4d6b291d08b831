"""Task scorers in the adapter store, found by instruction, used only where the guard allowed.

A task scorer is a scorer adapted to one task, kept as a LoRA over the scorer it started from
(:mod:`capplug.scoring.lora`). :class:`TaskScorers` keeps them in an :class:`AdapterStore` whose
base model is that scorer: the same folder layout, Chroma index, sha256 checks, locking, names
and repair as LLM adapters, in the scorer's own collection (a store root may hold both kinds).

Each is indexed by its task's instruction and carries the guard's verdict in its safetensors
header (``capplug_guard``: the mean label of the default's and the adapted scorer's picks on
held-out feedback, and whether to use it). :meth:`TaskScorers.find` looks up the instruction's
task (:func:`capplug.chat.task_text`: a chat's system turns, else the whole text) and returns the
nearest task scorer within the threshold that the guard allowed, merged into a scorer sharing
the default's untouched weights (the ``max_loaded`` most recent stay in memory), or ``None``
for the default; either way with the facts for the selection's ``capplug`` metadata.

Lookups read the index every time, so task scorers added by another process (``capplug adapt
--from-feedback --task-scorers DIR``) are used from the next selection on, without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capplug._cache import cache_home
from capplug.adapters.store import AdapterStore, instruction_hash
from capplug.adapters.store.records import AdapterRecord
from capplug.chat import Instruction, blank, task_text
from capplug.errors import AdapterFileError, UnknownAdapterError
from capplug.models.adapter_folder import (
    AdapterFiles,
    linear_shapes,
    read_adapter,
)
from capplug.scoring.lora import KIND, META_KIND

logger = logging.getLogger(__name__)

__all__ = ["META_GUARD", "TaskScorerChoice", "TaskScorers", "default_task_scorers_path"]

META_GUARD = "capplug_guard"
"""The guard's verdict (JSON) in a task scorer's safetensors header."""
DEFAULT_THRESHOLD = 0.8


def default_task_scorers_path() -> Path:
    """``$CAPPLUG_TASK_SCORERS``, else ``task-scorers`` in the capplug home."""
    env = os.environ.get("CAPPLUG_TASK_SCORERS")
    return Path(env).expanduser() if env else cache_home() / "task-scorers"


@dataclass(frozen=True)
class TaskScorerChoice:
    """Which scorer a selection uses, and why."""

    scorer: Any | None
    """The task scorer to use, or ``None`` for the default."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-ready facts for the ``task_scorer`` entry of the ``capplug`` metadata."""


class TaskScorers:
    """Task scorers for one scorer, kept in an adapter store and found by instruction.

    Args:
        root: the store folder (default: :func:`default_task_scorers_path`).
        scorer: the default scorer (a :class:`~capplug.scoring.Scorer`) they adapt.
        threshold: the least instruction similarity, in [0, 1], that finds a task scorer.
        max_loaded: task scorers kept merged in memory (each costs the adapted layers: about
            40 MB for MiniLM).
        chroma_url: a shared Chroma server, as for :class:`AdapterStore`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        scorer: Any,
        threshold: float = DEFAULT_THRESHOLD,
        max_loaded: int = 4,
        chroma_url: str | None = None,
    ) -> None:
        if not hasattr(scorer, "with_lora"):
            raise TypeError(
                "task scorers adapt a capplug Scorer; got "
                f"{type(scorer).__name__} (load one with Scorer.from_pretrained)"
            )
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise ValueError(f"max_loaded must be an integer >= 1; got {max_loaded!r}")
        self.scorer = scorer
        self.store = AdapterStore(
            default_task_scorers_path() if root is None else root,
            base_model=scorer.name,
            threshold=threshold,
            chroma_url=chroma_url,
        )
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._verdicts: dict[tuple[str, str], dict[str, Any]] = {}
        self._found: OrderedDict[str, tuple[str, list[tuple[AdapterRecord, float]]]] = OrderedDict()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"TaskScorers({str(self.store.root)!r}, scorer={self.scorer.name!r})"

    @property
    def threshold(self) -> float:
        return self.store.threshold

    # ------------------------------------------------------------------------------ adding

    def add(
        self,
        folder: str | os.PathLike[str],
        instruction: str,
        *,
        guard: Any = None,
        name: str | None = None,
        selections: int | None = None,
    ) -> AdapterRecord:
        """Store the task scorer in ``folder`` (``capplug adapt --lora-rank`` writes one) for the
        task ``instruction``, with the guard's verdict (a :class:`~capplug.scoring.guard.
        GuardReport` or its dict; ``None`` stores it as not checked, so it is not used) and
        the number of judged ``selections`` it was adapted on (kept in the verdict, read back by
        :meth:`adapted_on`).

        Once stored, a task scorer the guard allowed replaces the older ones for the same
        instruction; one it refused leaves them in use.

        Raises:
            WrongBaseModelError: it adapts another scorer.
            AdapterFileError: missing, truncated or corrupt files, or not a task scorer.
        """
        files = read_adapter(
            folder, identity=self.scorer.identity, shapes=linear_shapes(self.scorer.model)
        )
        if files.metadata.get(META_KIND) != KIND:
            raise AdapterFileError(
                f"{files.folder} is an adapter for a language model, not a task scorer (its "
                f"header has no {META_KIND}={KIND}); make one with capplug adapt --lora-rank"
            )
        verdict = _verdict_dict(guard)
        if selections is not None:
            verdict["selections"] = selections
        record = self.store.put(
            files.state_dict,
            files.config,
            instruction=instruction,
            source="trained",
            name=name,
            metadata={**files.metadata, META_GUARD: json.dumps(verdict)},
        )
        if verdict["use"]:
            for older in self._same_task(record.instruction):
                if older.id != record.id:
                    self.store.remove(older.id)
        return record

    def _same_task(self, task: str) -> list[AdapterRecord]:
        """The stored task scorers for exactly ``task`` (the same text once normalised), newest
        first; an exact repeat is looked up without the encoder."""
        wanted = instruction_hash(task)
        matches = self.store.lookup(task, threshold=1.0, k=100)
        return [m.record for m in matches if m.record.instruction_hash == wanted]

    # ------------------------------------------------------------------------------ finding

    def find(self, instruction: Instruction) -> TaskScorerChoice:
        """The task scorer for ``instruction``'s task, or ``None`` with the reason."""
        task = task_text(instruction)
        if blank(task):
            return TaskScorerChoice(None, {"used": False, "reason": "the instruction is empty"})
        task = task[: self.store.max_instruction_chars]
        with self._lock:
            matches = self._matches(task)
        refused = None
        for record, similarity in matches:
            info: dict[str, Any] = {
                "id": record.id,
                "name": record.name,
                "instruction": record.instruction,
                "similarity": round(similarity, 4),
            }
            try:
                verdict, scorer = self._load(record)
            except (AdapterFileError, UnknownAdapterError, OSError) as exc:
                refused = refused or {**info, "guard": None, "error": str(exc)}
                continue
            info["guard"] = verdict
            if scorer is None:
                refused = refused or info
                continue
            return TaskScorerChoice(scorer, {**info, "used": True})
        if refused is not None:
            reason = refused.get("error") or refused["guard"].get("reason", "")
            logger.debug("task %r: the default scores (%s)", task[:80], reason)
            return TaskScorerChoice(
                None, {**refused, "used": False, "reason": f"default scorer: {reason}"}
            )
        return TaskScorerChoice(
            None,
            {
                "used": False,
                "reason": f"no task scorer within similarity {self.threshold} of this task",
            },
        )

    def adapted_on(self, task: str) -> int | None:
        """How many judged selections the latest adaptation of exactly ``task`` saw (the most
        any stored task scorer for it was adapted on, whether its guard allowed it or not), or
        ``None`` when none says."""
        text = task[: self.store.max_instruction_chars]
        if blank(text):
            return None
        with self._lock:
            records = self._same_task(text)
        counts = []
        for record in records:
            try:
                count = self.verdict(record).get("selections")
            except (AdapterFileError, OSError):
                continue
            if isinstance(count, int) and not isinstance(count, bool):
                counts.append(count)
        return max(counts, default=None)

    def verdict(self, record: AdapterRecord) -> dict[str, Any]:
        """The guard's verdict stored with a task scorer (read once per stored file)."""
        key = (record.id, record.sha256)
        cached = self._verdicts.get(key)
        if cached is None:
            cached = self._verdicts[key] = _stored_verdict(read_adapter(record.folder))
        return cached

    def list(self) -> list[dict[str, Any]]:
        """Every stored task scorer with its guard verdict, most recently used first."""
        out = []
        for record in self.store.list_adapters():
            try:
                verdict = self.verdict(record)
            except (AdapterFileError, OSError) as exc:
                verdict = {"use": False, "reason": f"unreadable: {exc}"}
            out.append({**record.to_dict(), "guard": verdict})
        return out

    def _matches(self, task: str) -> list[tuple[AdapterRecord, float]]:
        generation = self.store.generation()
        cached = self._found.get(task)
        if cached is not None and generation is not None and cached[0] == generation:
            self._found.move_to_end(task)
            return cached[1]
        matches = [(m.record, m.similarity) for m in self.store.lookup(task, k=3)]
        if generation is not None:
            self._found[task] = (generation, matches)
            while len(self._found) > 1024:
                self._found.popitem(last=False)
        return matches

    def _load(self, record: AdapterRecord) -> tuple[dict[str, Any], Any | None]:
        """``(the guard's verdict, the merged task scorer or None where it is not to be
        used)``; the files are hashed against the index and read once per stored file."""
        key = (record.id, record.sha256)
        with self._lock:
            verdict = self._verdicts.get(key)
            scorer = self._loaded.get(key)
            if scorer is not None:
                self._loaded.move_to_end(key)
                return verdict or {}, scorer
        if verdict is not None and not verdict.get("use"):
            return verdict, None
        paths = self.store.files(record.id)  # hashed against the index
        files = read_adapter(
            paths.folder, identity=self.scorer.identity, shapes=linear_shapes(self.scorer.model)
        )
        verdict = _stored_verdict(files)
        scorer = self.scorer.with_lora(files) if verdict.get("use") else None
        with self._lock:
            self._verdicts[key] = verdict
            if scorer is not None:
                self._loaded[key] = scorer
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
        return verdict, scorer

    def close(self) -> None:
        self.store.close()


def _verdict_dict(guard: Any) -> dict[str, Any]:
    if guard is None:
        return {"use": False, "reason": "not checked by the guard; adapt with a held-out slice"}
    verdict = guard.to_dict() if hasattr(guard, "to_dict") else dict(guard)
    if not isinstance(verdict.get("use"), bool):
        raise ValueError("the guard verdict must say 'use': true or false")
    return verdict


def _stored_verdict(files: AdapterFiles) -> dict[str, Any]:
    raw = files.metadata.get(META_GUARD)
    if raw is None:
        return {"use": False, "reason": "stored without a guard verdict"}
    try:
        verdict = json.loads(raw)
    except ValueError:
        return {"use": False, "reason": "its guard verdict is unreadable"}
    if not isinstance(verdict, dict) or not isinstance(verdict.get("use"), bool):
        return {"use": False, "reason": "its guard verdict is unreadable"}
    return verdict
