"""Reading labelled (instruction, response) pairs from JSONL, CSV, Parquet, or a folder of shards."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from capplug.chat import flatten_chat
from capplug.errors import RowError

__all__ = ["LabelledPair", "RowError", "labelled_pairs", "read_labelled_pairs"]

_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class LabelledPair:
    """One training pair: how well ``response`` answers ``instruction``, as ``label`` in [0, 1]."""

    instruction: str
    response: str
    label: float
    group: str
    """Pairs of one group (a task example) stay together when a held-out slice is cut."""
    source: str = ""


def read_labelled_pairs(
    path: str | Path, *, labels: Literal["auto", "label", "reference"] = "auto"
) -> list[LabelledPair]:
    """Read and check every row of a data file before anything trains on it.

    Each row needs ``instruction`` (a string, or a chat in JSONL) and ``response``, plus either
    ``label`` (a number in [0, 1]) or ``reference`` (a string or list of strings: the label
    becomes the response's Rouge-L F against it). Optional ``task`` and ``example_id`` (or
    ``group``) keep one example's pairs together when a held-out slice is cut.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty or of an unknown format.
        RowError: rows are unusable; every problem is listed with its row number.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    raw = list(_raw_rows(path))
    if not raw:
        raise ValueError(
            f"{path} holds no rows; give a JSONL, CSV or Parquet file with at least one row"
        )
    return _checked(raw, labels, where=path)


def labelled_pairs(
    rows: Iterable[dict[str, Any]],
    *,
    labels: Literal["auto", "label", "reference"] = "auto",
    where: str = "rows",
) -> list[LabelledPair]:
    """Check rows already in memory (as :func:`read_labelled_pairs` reads them from a file:
    a feedback store's, say) and make training pairs of them; ``where`` names them in errors.

    Raises:
        RowError: rows are unusable; every problem is listed with its row number (from 1).
    """
    return _checked(list(enumerate(rows, start=1)), labels, where=where)


def _checked(
    raw: list[tuple[int, dict[str, Any]]], labels: str, *, where: str | Path
) -> list[LabelledPair]:
    pairs: list[LabelledPair] = []
    problems: list[str] = []
    for number, row in raw:
        try:
            pairs.append(_pair(row, labels))
        except ValueError as exc:
            problems.append(f"row {number}: {exc}")
    if problems:
        raise RowError(where, problems, len(raw))
    return pairs


def _pair(row: dict[str, Any], labels: str) -> LabelledPair:
    if "__error__" in row:
        raise ValueError(row["__error__"])
    missing = [f for f in ("instruction", "response") if row.get(f) is None]
    if missing:
        raise ValueError(f"missing {' and '.join(repr(f) for f in missing)}")
    try:
        instruction = flatten_chat(row["instruction"])
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    response = row["response"]
    if not isinstance(response, str):
        raise ValueError(f"'response' must be a string; got {type(response).__name__}")
    has_label = row.get("label") not in (None, "")
    has_reference = row.get("reference") not in (None, "", [])
    if labels == "label" or (labels == "auto" and has_label):
        label = _label(row.get("label"))
    elif has_reference:
        label = _rouge_label(response, row["reference"])
    else:
        raise ValueError("give 'label' (a number in [0, 1]) or 'reference' (the correct answer)")
    group = row.get("group")
    if group in (None, "") and row.get("task") not in (None, ""):
        group = f"{row['task']}#{row.get('example_id', '')}"
    if group in (None, ""):
        group = hashlib.sha1(instruction.encode()).hexdigest()[:16]
    return LabelledPair(instruction, response, label, str(group), str(row.get("source") or ""))


def _label(value: Any) -> float:
    if value is None or value == "":
        raise ValueError("missing 'label'")
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"'label' must be a number in [0, 1]; got {value!r}") from None
    if not math.isfinite(label) or not 0.0 <= label <= 1.0:
        raise ValueError(f"'label' {value!r} is outside [0, 1]")
    return label


def _rouge_label(response: str, reference: Any) -> float:
    from capplug.data.labels import rouge_l

    references = [reference] if isinstance(reference, str) else reference
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError("'reference' must be a string or a list of strings")
    return float(rouge_l(response, references))


def _raw_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise ValueError(f"{path} is a folder with no .parquet shards")
        number = 0
        for shard in shards:
            for row in _parquet_rows(shard):
                number += 1
                yield number, row
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    row = {"__error__": f"not valid JSON ({exc.msg})"}
                yield number, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            # Row 1 is the header, so data rows are numbered as a spreadsheet shows them.
            for number, row in enumerate(csv.DictReader(handle), start=2):
                yield number, dict(row)
    elif suffix == ".parquet":
        yield from enumerate(_parquet_rows(path), start=1)
    else:
        raise ValueError(
            f"{path}: unknown data format {suffix!r}; use one of {', '.join(_FORMATS)}"
        )


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("reading Parquet needs pyarrow: pip install 'capplug[train]'") from exc
    table = pq.read_table(path)
    yield from table.to_pylist()
