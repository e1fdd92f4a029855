"""Atomic writes of a run's files and folders: a reader (a resume, ``corrpo report``, ``from_pretrained``) sees the
old version or the new one, whole, never a half-written one, whatever kills the writer (SIGKILL, a full disk).

One recipe, the checkpoints' too (``callbacks/checkpoint.py``): write a temp sibling ``.<name>.partial-<pid>`` (same
folder, so same filesystem), fsync it, ``os.replace`` it onto the target, fsync the parent. A folder cannot be
replaced over a non-empty one in one call: the old folder is first renamed aside (``.<name>.old-<pid>``), then the new
one into place, then the old one deleted. A writer killed between those renames leaves no target (and the run no
``results.json``, written last): the run is unfinished and its resume writes the folder again.
:func:`remove_leftovers` deletes what killed writers left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_sibling(target: Path, mark: str = PARTIAL_MARK) -> Path:
    return target.with_name(f".{target.name}{mark}{os.getpid()}")


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(handle)`` into a temp sibling of ``path`` opened for binary writing, fsynced and renamed onto ``path``;
    a failed write (disk full, an object that cannot be saved) leaves the old file and no temp."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _temp_sibling(target)
    try:
        with partial.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; when the block ends without an error, fsync every file in it and
    put it in place of ``target`` (replacing an older one). On an error the temp folder is removed, ``target`` kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _temp_sibling(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        for path in sorted(partial.rglob("*")):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        for folder in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
            fsync_dir(folder)
        old = _temp_sibling(target, OLD_MARK)
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders (``.<name>.partial-<pid>``, ``.<name>.old-<pid>``) that killed atomic writers
    left directly in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(".") and (PARTIAL_MARK in p.name or OLD_MARK in p.name)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
