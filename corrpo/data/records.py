"""Load user records (SFT traces or RL prompts) from jsonl/json/parquet files or a Hugging Face dataset.

Every record comes out with canonical keys: ``prompt`` always, ``completion`` (the reasoning trace) for SFT,
``answer`` (the gold answer, a string) for RL; the other key is kept when the row has a usable value. A
malformed row raises :class:`RecordError` naming the file, the 1-based line (or row) and the field, so a
bad line in a 100k-line file is found at once; ``on_error="skip"`` drops such rows and counts them.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANONICAL_FIELDS: tuple[str, ...] = ("prompt", "completion", "answer")
REQUIRED: dict[str, tuple[str, ...]] = {"sft": ("prompt", "completion"), "rl": ("prompt", "answer")}
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
MAX_ERRORS_KEPT = 10


class RecordError(ValueError):
    """A malformed row; the message names the source, the 1-based line or row number, and the field."""


@dataclass
class LoadResult:
    """The records read, how many rows were skipped (``on_error="skip"``) and the first few reasons."""

    records: list[dict[str, str]]
    n_skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` per non-blank line; a line that is not a JSON object yields a RecordError."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            yield where, row


def _rows_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file holding one JSON array of objects, or (like jsonl) one object per line."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _rows_jsonl(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
    for number, row in enumerate(rows, start=1):
        yield f"{path}: item {number}", row


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    for number, row in enumerate(pd.read_parquet(path).to_dict(orient="records"), start=1):
        yield f"{path}: row {number}", row


def _rows_hf(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading the Hugging Face dataset {name!r} needs the `datasets` package: pip install corrpo[hf]"
        ) from err
    for number, row in enumerate(datasets.load_dataset(name, split=split), start=1):
        yield f"{name}[{split}]: row {number}", row


def _rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() or suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"data file {source!r} does not exist")
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"data file {source!r}: unsupported suffix {suffix!r}; use one of {FILE_SUFFIXES}")
        reader = {".jsonl": _rows_jsonl, ".json": _rows_json, ".parquet": _rows_parquet}[suffix]
        return reader(path)
    return _rows_hf(source, split)


def _text(value: Any, canonical: str) -> str | None:
    """A usable string for a field, or None. Answers may be numbers (converted); the rest must be strings."""
    if canonical == "answer" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _convert(where: str, row: Any, kind: str, columns: dict[str, str]) -> dict[str, str]:
    """One canonical record from one row, or a RecordError naming the location and the field."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    record = {}
    for canonical in CANONICAL_FIELDS:
        column = columns[canonical]
        label = canonical if column == canonical else f"{canonical!r} (column {column!r})"
        value = row.get(column)
        text = _text(value, canonical)
        if text is not None:
            record[canonical] = text
        elif canonical in REQUIRED[kind]:
            problem = "missing" if column not in row else f"must be a non-empty string, got {value!r:.60}"
            raise RecordError(f"{where}: field {label} {problem}")
    return record


def load_records(
    source: str,
    kind: str,
    fields: dict[str, str] | None = None,
    on_error: str = "raise",
    split: str = "train",
) -> LoadResult:
    """Read SFT traces (``kind="sft"``: prompt + completion) or RL prompts (``kind="rl"``: prompt + answer).

    Args:
        source: a ``.jsonl`` / ``.json`` (one JSON object per line, or one array) / ``.parquet`` path, or a
            Hugging Face dataset name (needs ``pip install corrpo[hf]``).
        kind: ``"sft"`` or ``"rl"``; decides which fields are required.
        fields: canonical name -> column name, e.g. ``{"prompt": "question", "answer": "final"}``; fields not
            named keep their canonical column name.
        on_error: ``"raise"`` the first :class:`RecordError`, or ``"skip"`` malformed rows and count them.
        split: the split of a Hugging Face dataset.
    """
    if kind not in REQUIRED:
        raise ValueError(f"kind must be one of {tuple(REQUIRED)}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    unknown = set(fields or {}) - set(CANONICAL_FIELDS)
    if unknown:
        raise ValueError(f"fields: unknown canonical names {sorted(unknown)}; expected some of {CANONICAL_FIELDS}")
    columns = {name: (fields or {}).get(name, name) for name in CANONICAL_FIELDS}
    result = LoadResult(records=[])
    for where, row in _rows(source, split):
        try:
            if isinstance(row, RecordError):
                raise row
            result.records.append(_convert(where, row, kind, columns))
        except RecordError as err:
            if on_error == "raise":
                raise
            result.n_skipped += 1
            if len(result.errors) < MAX_ERRORS_KEPT:
                result.errors.append(str(err))
    return result
