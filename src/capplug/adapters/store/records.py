"""What the adapter store keeps about an adapter: its record, the store's layout names, the record
file beside the peft files, and the check of those files against their recorded sha256."""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from capplug._cache import sha256_file
from capplug.errors import CorruptAdapterError
from capplug.models.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

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
    "AdapterPaths",
    "AdapterRecord",
    "Generator",
    "HitCheck",
    "Match",
    "Result",
    "Side",
    "Source",
    "StoreReport",
    "adapter_paths",
    "checked_paths",
    "file_signature",
    "instruction_hash",
    "normalize_instruction",
    "read_record_file",
    "record_file",
    "records_from_rows",
    "settled",
]

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
ADAPTER_FILES: tuple[str, ...] = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
"""The two files of a stored adapter, the only ones :meth:`AdapterStore.read_file` reads."""

Source = Literal["generated", "trained", "imported"]
SOURCES: tuple[str, ...] = ("generated", "trained", "imported")
Generator = Callable[[str], "tuple[Mapping[str, torch.Tensor], LoraConfig | Mapping[str, Any]]"]
HitCheck = Callable[["AdapterRecord", str], bool]

_WHITESPACE = re.compile(r"\s+")

Side = Literal["adapter", "base"]
SIDES: tuple[str, ...] = get_args(Side)


@dataclass(frozen=True)
class AdapterCheck:
    """The judged fallback's verdict on an adapter: its answer to a probe against the bare base
    model's, judged by a selector (:class:`capplug.adapters.AdapterJudge`).

    An adapter whose answer lost is kept but not used: requests for its instruction get the
    base model, until it is checked again or made again, or a person pins it
    (:attr:`AdapterRecord.pinned`).
    """

    winner: Side
    adapter_score: float
    """The judge's score of the adapter's answer (the fused selector's, in [0, 1])."""
    base_score: float
    """The judge's score of the base model's answer."""
    probe: str
    """The user turn both answered (shortened to 500 characters)."""
    judge: str
    """What judged: the selector's scorer, say."""
    checked: float
    """Unix time."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterCheck:
        """A check as :meth:`to_dict` wrote it.

        Raises:
            ValueError: not one (a wrong side, a missing or malformed field).
        """
        try:
            check = cls(
                winner=data["winner"],
                adapter_score=float(data["adapter_score"]),
                base_score=float(data["base_score"]),
                probe=str(data["probe"]),
                judge=str(data["judge"]),
                checked=float(data["checked"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an adapter check: {exc}") from exc
        if check.winner not in SIDES:
            raise ValueError(
                f"an adapter check's winner is 'adapter' or 'base'; got {check.winner!r}"
            )
        return check


def _side(value: Any) -> Side | None:
    return value if value in SIDES else None


def _check_from(data: Any) -> AdapterCheck | None:
    """The check a record file or index row holds (a dict, or its JSON); None for none or for
    one that cannot be read (the adapter is then checked again)."""
    if isinstance(data, str):
        if not data:
            return None
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if not isinstance(data, Mapping):
        return None
    try:
        return AdapterCheck.from_dict(data)
    except ValueError:
        return None


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
    name: str | None = None
    """The unique name the adapter was given (:meth:`AdapterStore.rename`), or None."""
    check: AdapterCheck | None = None
    """The judged fallback's last verdict (:meth:`AdapterStore.set_check`), or None."""
    pinned: Side | None = None
    """A person's choice that outweighs the check (:meth:`AdapterStore.pin`), or None."""
    folder: Path = field(default=Path(), compare=False)

    @property
    def falls_back(self) -> bool:
        """Whether requests for this adapter's instruction get the bare base model instead: it
        lost its check, and is not pinned to be used."""
        if self.pinned is not None:
            return self.pinned == "base"
        return self.check is not None and self.check.winner == "base"

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


# ------------------------------------------------------------------------------ record files


def record_file(record: AdapterRecord) -> dict[str, Any]:
    """What ``<id>/capplug-adapter.json`` holds: the record, less its folder and last use."""
    data = record.to_dict()
    data.pop("folder")
    data.pop("last_used")
    return {"format": FORMAT, **data}


def read_record_file(folder: Path) -> AdapterRecord | None:
    """The record an adapter folder keeps beside its files; None when it is missing, unreadable
    or names another folder."""
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
            name=data.get("name") or None,
            check=_check_from(data.get("check")),
            pinned=_side(data.get("pinned")),
            folder=folder,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def records_from_rows(rows: Mapping[str, Any], root: Path, base_model: str) -> list[AdapterRecord]:
    """The records of index rows (Chroma's ``get`` or one query's columns), their last use the
    later of the indexed one and the ``.last-used`` file's."""
    ids = rows.get("ids") or []
    metadatas = rows.get("metadatas") or [None] * len(ids)
    documents = rows.get("documents") or [None] * len(ids)
    out = []
    for adapter_id, meta, document in zip(ids, metadatas, documents, strict=True):
        meta = meta or {}
        folder = root / adapter_id
        indexed_use = float(meta.get("last_used", 0.0))
        try:
            last_used = max(indexed_use, (folder / LAST_USED_FILE).stat().st_mtime)
        except OSError:
            last_used = indexed_use
        out.append(
            AdapterRecord(
                id=adapter_id,
                instruction=document or "",
                base_model=str(meta.get("base_model", base_model)),
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
                name=str(meta.get("name") or "") or None,
                check=_check_from(meta.get("check")),
                pinned=_side(meta.get("pinned")),
                folder=folder,
            )
        )
    return out


# ------------------------------------------------------------------------------ checked files


def checked_paths(record: AdapterRecord) -> AdapterPaths:
    """The record's folder and files, after checking both against their recorded sha256.

    Raises:
        CorruptAdapterError: a file is missing or changed since it was stored.
    """
    paths = adapter_paths(record)
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


def adapter_paths(record: AdapterRecord) -> AdapterPaths:
    """The record's folder and files, not checked."""
    folder = record.folder
    return AdapterPaths(record.id, folder, folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG)


def file_signature(record: AdapterRecord) -> tuple[int, ...] | None:
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


def settled(signature: tuple[int, ...]) -> bool:
    """Both files were last modified more than ``SETTLED_SECONDS`` ago (see
    :func:`file_signature`)."""
    newest = max(signature[1], signature[6])
    return time.time_ns() - newest > SETTLED_SECONDS * 1e9
