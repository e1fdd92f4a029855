"""Load user records (SFT traces or RL prompts) from jsonl/json/parquet files or a Hugging Face dataset.

Every record comes out with canonical keys: ``prompt`` always, ``completion`` (the reasoning trace) for SFT,
``answer`` (the gold answer, a string) for RL; the other key is kept when the row has a usable value, and with
``keep_columns`` every non-canonical column too (the dataset columns a TRL-style reward reads by name). A
malformed row raises :class:`RecordError` naming the file, the 1-based line (or row), the field and the columns
the row has, so a bad line in a 100k-line file (or a misnamed column) is found at once; ``on_error="skip"``
drops such rows and counts them.

Both of TRL's dataset formats are read: *standard* (``prompt`` and ``completion`` are strings) and
*conversational* (``prompt`` is a list of ``{"role": "system"|"user", "content": ...}`` messages, ``completion``
a list of ``{"role": "assistant", ...}`` messages). A conversational field stays a message list in the record
(:func:`corrpo.models.batching.format_prompt` renders it with the chat template); TRL's RL datasets name the gold
answer ``solution``: a row without ``answer`` (and no ``fields`` mapping for it) takes its answer from
``solution`` (the content of its last ``\\boxed{}``, else the whole text), and keeps ``solution`` as a column.

A Hugging Face source is ``name[:config][[split]]``, e.g. ``openai/gsm8k:main[test]`` (the split defaults
to ``split``; slices such as ``train[:1000]`` pass through to ``datasets``), or a folder written by
``datasets``' ``save_to_disk`` (``folder`` or ``folder[split]``; a ``DatasetDict`` folder gives the named split,
else ``split``). A field mapping value is a column name or ``"column|transform"`` with a named transform of
:mod:`corrpo.data.transforms`, e.g. ``{"answer": "solution|boxed"}``.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corrpo.data.reasoning_gym_source import PREFIX as REASONING_GYM_PREFIX
from corrpo.data.transforms import TransformError, parse_field
from corrpo.rewards.answer import last_boxed

CANONICAL_FIELDS: tuple[str, ...] = ("prompt", "completion", "answer")
REQUIRED: dict[str, tuple[str, ...]] = {"sft": ("prompt", "completion"), "rl": ("prompt", "answer")}
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
# Suffixes that make a source a local path even when the file is missing: "no such file", not a Hugging Face
# dataset lookup of "data/train.csv" (a hub name never ends like a file).
PATH_SUFFIXES: tuple[str, ...] = (*FILE_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx", ".pkl")
MAX_ERRORS_KEPT = 10
SOLUTION_COLUMN = "solution"
"""TRL's name for the gold column of RL data (``trl.rewards.accuracy_reward(completions, solution)``)."""
SAVE_TO_DISK_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files ``datasets``' ``save_to_disk`` writes: a folder holding one is read with ``load_from_disk``."""
_FOLDER_SPLIT = re.compile(r"^(?P<path>.+)\[(?P<split>[^\[\]]+)\]$")
_HF_SOURCE = re.compile(r"^(?P<name>[^:\[\]\s]+)(?::(?P<config>[^:\[\]\s]+))?(?:\[(?P<split>.+)\])?$")


class RecordError(ValueError):
    """A malformed row; the message names the source, the 1-based line or row number, the field and the row's
    columns."""


@dataclass
class LoadResult:
    """The records read, how many rows were skipped (``on_error="skip"``) and the first few reasons."""

    records: list[dict[str, Any]]
    n_skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _not_utf8(where: str, err: UnicodeDecodeError) -> RecordError:
    byte = err.object[err.start : err.start + 1].hex()
    return RecordError(
        f"{where}: not UTF-8 text (byte 0x{byte} at column {err.start + 1}); re-encode the file as UTF-8"
    )


def _unreadable_json(where: str, err: BaseException) -> RecordError:
    """Valid JSON Python's reader refuses: a number of 4300+ digits, or nesting deeper than its stack."""
    reason = str(err).splitlines()[0][:120] if str(err) else ""
    return RecordError(f"{where}: JSON that cannot be read ({type(err).__name__}: {reason})")


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` per non-blank line; a line that is not UTF-8 or not a JSON object yields a RecordError
    (read as bytes and decoded line by line, so a bad byte names its line and ``on_error="skip"`` can skip it)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, _not_utf8(where, err)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            except (ValueError, RecursionError) as err:  # a 4300+-digit number; nesting deeper than Python's stack
                yield where, _unreadable_json(where, err)
                continue
            yield where, row


def _rows_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file holding one JSON array of objects, or (like jsonl) one object per line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        err = UnicodeDecodeError(err.encoding, data[start : err.end], err.start - start, err.end - start, err.reason)
        raise _not_utf8(f"{path}:{line}", err) from None
    if not text.lstrip().startswith("["):
        yield from _rows_jsonl(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
    except (ValueError, RecursionError) as err:  # a 4300+-digit number; nesting deeper than Python's stack
        raise _unreadable_json(str(path), err) from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}: item {number}", row


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    for number, row in enumerate(pd.read_parquet(path).to_dict(orient="records"), start=1):
        yield f"{path}: row {number}", row


def parse_hf_source(source: str, split: str = "train") -> tuple[str, str | None, str]:
    """``"name[:config][[split]]"`` -> ``(name, config or None, split)``; ``split`` when none is named."""
    match = _HF_SOURCE.match(source.strip())
    if match is None:
        raise ValueError(
            f"data source {source!r}: expected a .jsonl/.json/.parquet file or a Hugging Face dataset "
            "'name[:config][[split]]', e.g. 'openai/gsm8k:main[test]'"
        )
    return match["name"], match["config"], match["split"] or split


def _rows_hf(source: str, split: str) -> Iterator[tuple[str, Any]]:
    name, config, split = parse_hf_source(source, split)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading the Hugging Face dataset {name!r} needs the `datasets` package: pip install corrpo[hf]"
        ) from err
    label = f"{name}:{config}" if config else name
    rows = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split)
    for number, row in enumerate(rows, start=1):
        yield f"{label}[{split}]: row {number}", row


def saved_dataset_folder(source: str) -> tuple[Path, str | None] | None:
    """``(folder, split or None)`` when ``source`` (``folder`` or ``folder[split]``, absolute or relative) is a
    folder written by ``datasets``' ``save_to_disk``, else None."""
    match = _FOLDER_SPLIT.match(source.strip())
    candidates = [(source.strip(), None)] + ([(match["path"], match["split"])] if match else [])
    for name, split in candidates:
        folder = Path(name).expanduser()
        if folder.is_dir() and any((folder / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
            return folder, split
    return None


def _rows_saved(folder: Path, named_split: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """The rows of a ``save_to_disk`` folder: a ``Dataset``, or the split a ``DatasetDict`` folder is asked for
    (``folder[split]``, else ``split``)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"reading the save_to_disk folder {str(folder)!r} needs the `datasets` package: pip install corrpo[hf]"
        ) from err
    data = datasets.load_from_disk(str(folder))
    label = str(folder)
    if isinstance(data, datasets.DatasetDict):
        split = named_split or split
        if split not in data:
            raise ValueError(
                f"data source {label!r}: a DatasetDict folder without a split {split!r}; its splits are "
                f"{sorted(data)}: name one as '{label}[<split>]'"
            )
        data, label = data[split], f"{label}[{split}]"
    elif named_split is not None:
        raise ValueError(f"data source {label}[{named_split}]: {label!r} holds one Dataset, not a DatasetDict")
    for number, row in enumerate(data, start=1):
        yield f"{label}: row {number}", row


def _rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    if source.startswith(REASONING_GYM_PREFIX):
        raise ValueError(
            f"data source {source!r} is a generated reasoning-gym task: ReasoningDataModule serves it (as "
            "data.rl_source or data.test_source); load_records reads files and Hugging Face datasets"
        )
    saved = saved_dataset_folder(source)
    if saved is not None:
        return _rows_saved(*saved, split)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() or suffix in PATH_SUFFIXES or source.startswith(("./", "../", "/", "~")):
        if not path.is_file():
            kind = (
                "is a folder, not a file nor a datasets save_to_disk folder (it has none of "
                f"{', '.join(SAVE_TO_DISK_MARKERS)})"
                if path.is_dir()
                else "no such file"
            )
            raise FileNotFoundError(f"data file {source!r}: {kind} (resolved to {path.resolve()})")
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"data file {source!r}: unsupported suffix {suffix!r}; use one of {FILE_SUFFIXES}")
        reader = {".jsonl": _rows_jsonl, ".json": _rows_json, ".parquet": _rows_parquet}[suffix]
        return reader(path)
    return _rows_hf(source, split)


def _text(value: Any, canonical: str) -> str | None:
    """A usable string for a field, or None. Answers may be numbers (converted); the rest must be strings."""
    if canonical == "answer" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value)  # exact at any size (float() of a 400-digit integer overflows)
    if canonical == "answer" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


@functools.lru_cache(maxsize=64)
def _parsed_field(spec: str) -> tuple[str, Callable[[Any], str] | None]:
    """:func:`corrpo.data.transforms.parse_field`, once per spec rather than once per row."""
    return parse_field(spec)


def _messages(value: Any, canonical: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(messages, None)`` when ``value`` is a conversational field (TRL's format: a non-empty list of
    ``{"role", "content"}`` mappings with string contents; a completion's last message the assistant's), ``(None,
    problem)`` when it is a list that is not, ``(None, None)`` when it is no list at all. Lists from parquet
    (numpy arrays) and ``datasets`` become plain lists of plain dicts."""
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__") or canonical == "answer":
        return None, None
    messages = list(value)
    if not messages:
        return None, "is an empty message list"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return None, f"message {i} must be a {{role, content}} mapping, got {message!r:.60}"
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            return None, f"message {i} must have a string role and content, got {dict(message)!r:.60}"
    if canonical == "completion" and (messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip()):
        return None, "must end with a non-empty assistant message (TRL's conversational completion)"
    if canonical == "prompt" and not any(m["content"].strip() for m in messages):
        return None, "has no message with content"
    return [dict(message) for message in messages], None


def _solution_answer(value: Any) -> str | None:
    """The gold answer in TRL's ``solution`` column: its last ``\\boxed{}``'s content, else the whole text."""
    text = _text(value, "answer")
    if text is None:
        return None
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None and boxed.strip() else text


def _columns(row: dict) -> str:
    return f"(columns: {', '.join(map(str, row))})" if row else "(the row has no columns)"


def _convert(where: str, row: Any, kind: str, specs: dict[str, str], keep_columns: bool = False) -> dict[str, Any]:
    """One canonical record from one row, or a RecordError naming the location, the field and the row's columns."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    record = {}
    for canonical in CANONICAL_FIELDS:
        spec = specs[canonical]
        column, transform = _parsed_field(spec)
        label = canonical if spec == canonical else f"{canonical!r} (column {spec!r})"
        if canonical == "answer" and spec == canonical and column not in row and SOLUTION_COLUMN in row:
            column, transform = SOLUTION_COLUMN, _solution_answer  # TRL's RL datasets: the gold is `solution`
        value, problem = row.get(column), None
        if transform is not None and column in row:
            try:
                value = transform(value)
            except TransformError as err:
                value, problem = None, str(err)
        messages, message_problem = _messages(value, canonical) if problem is None else (None, None)
        usable = messages if messages is not None else _text(value, canonical)
        if usable is not None:
            record[canonical] = usable
        elif canonical in REQUIRED[kind]:
            if problem is None and column not in row:
                problem = f"missing {_columns(row)}"
            elif problem is None:
                problem = message_problem or (
                    f"must be a non-empty string or a list of {{role, content}} messages, got {value!r:.60}"
                    if canonical != "answer"
                    else f"must be a non-empty string or a number, got {value!r:.60}"
                )
            raise RecordError(f"{where}: field {label} {problem}")
    if isinstance(record.get("completion"), list) and not isinstance(record["prompt"], list):
        raise RecordError(
            f"{where}: field 'completion' is a message list but 'prompt' is text: TRL's conversational format has "
            "both as message lists (or map the completion to text with a 'column|assistant' field)"
        )
    if keep_columns:  # the row's other columns, as they are: TRL-style rewards read them by name
        record.update({key: value for key, value in row.items() if key not in CANONICAL_FIELDS})
    return record


def load_records(
    source: str,
    kind: str,
    fields: dict[str, str] | None = None,
    on_error: str = "raise",
    split: str = "train",
    keep_columns: bool = False,
) -> LoadResult:
    """Read SFT traces (``kind="sft"``: prompt + completion) or RL prompts (``kind="rl"``: prompt + answer).

    Args:
        source: a ``.jsonl`` / ``.json`` (one JSON object per line, or one array) / ``.parquet`` path, a
            ``save_to_disk`` folder (``folder`` or ``folder[split]``), or a Hugging Face dataset
            ``name[:config][[split]]`` (both need ``pip install corrpo[hf]``). Prompts and completions are
            strings or TRL's conversational message lists.
        kind: ``"sft"`` or ``"rl"``; decides which fields are required (an RL row without ``answer`` takes it
            from TRL's ``solution`` column).
        fields: canonical name -> column name, e.g. ``{"prompt": "question", "answer": "final"}``, or
            ``"column|transform"`` (:mod:`corrpo.data.transforms`: ``gsm8k_answer``, ``gsm8k_solution``,
            ``boxed``, ``user``, ``assistant``); fields not named keep their canonical column name.
        on_error: ``"raise"`` the first :class:`RecordError`, or ``"skip"`` malformed rows and count them.
        split: the split of a Hugging Face dataset whose source names none.
        keep_columns: keep every other column of a row in its record under its own name (e.g. the ``solution``
            of a dataset whose ``answer`` is ``solution|boxed``), so that reward functions get them by keyword.
    """
    if kind not in REQUIRED:
        raise ValueError(f"kind must be one of {tuple(REQUIRED)}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    unknown = set(fields or {}) - set(CANONICAL_FIELDS)
    if unknown:
        raise ValueError(f"fields: unknown canonical names {sorted(unknown)}; expected some of {CANONICAL_FIELDS}")
    columns = {name: (fields or {}).get(name, name) for name in CANONICAL_FIELDS}
    for spec in columns.values():
        if not isinstance(spec, str):
            raise ValueError(f"fields: column names must be strings, got {spec!r}")
        _parsed_field(spec)  # unknown transform names fail here, before any row is read
    result = LoadResult(records=[])
    for where, row in _rows(source, split):
        try:
            if isinstance(row, RecordError):
                raise row
            result.records.append(_convert(where, row, kind, columns, keep_columns))
        except RecordError as err:
            if on_error == "raise":
                raise
            result.n_skipped += 1
            if len(result.errors) < MAX_ERRORS_KEPT:
                result.errors.append(str(err))
    return result
