"""Which code made a run: the corrpo package version and, in a git checkout, its commit and whether it had edits.

Recorded as ``code_version`` in a run's config.yaml (the resume comparison ignores it) and in results.json, so a
result can be traced to the code that produced it and a resume by other code is seen (:func:`describe`). Reading
it never fails a run: without git, or outside a checkout (an installed wheel), ``commit`` and ``dirty`` are None.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding ``corrpo/``: the repository root in a source checkout (``pip install -e .``)."""


def _git(*args: str) -> str | None:
    """``git <args>`` in the package's checkout, stripped; None when there is no checkout, no git, or it fails."""
    if not (PACKAGE_ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | bool | None]:
    """``{"corrpo": "0.1.0", "commit": "<40 hex>" | None, "dirty": bool | None}`` of the running code (once per
    process). ``dirty``: tracked files differ from the commit (untracked files are not counted)."""
    try:
        version = importlib.metadata.version("corrpo")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"corrpo": version, "commit": commit, "dirty": None if status is None else bool(status)}


def describe(version: dict | None) -> str:
    """``corrpo 0.1.0 at 1a2b3c4d (with uncommitted changes)``; ``unknown code`` for a run that recorded none."""
    if not isinstance(version, dict):
        return "unknown code"
    text = f"corrpo {version.get('corrpo', '?')}"
    if version.get("commit"):
        text += f" at {str(version['commit'])[:8]}"
    return text + (" (with uncommitted changes)" if version.get("dirty") else "")
