"""The wandb run files under a run folder, one per session of a (possibly resumed) run, in the order written.

wandb writes each session of a run to ``<run_dir>/wandb/<mode>-<YYYYmmdd_HHMMSS>-<run id>[-<n>]/run-<run id>.wandb``
(``<mode>`` is ``run`` or ``offline-run``). The ``-<n>`` suffix appears when a session of the same run id starts
within the same second as an earlier one, e.g. a quick ``--ckpt_path last`` resume; so the run id is read from the
file name, never from the end of the folder name, and the suffix orders sessions that share a timestamp.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple


class WandbSegment(NamedTuple):
    """One session's ``run-<id>.wandb`` file, the run id it belongs to, and its place in time."""

    log: Path
    run_id: str
    order: tuple[str, int, float]


def _segment(log: Path) -> WandbSegment:
    run_id = log.stem.removeprefix("run-")
    folder = re.fullmatch(rf"(?:offline-)?run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?", log.parent.name)
    mtime = log.stat().st_mtime
    if folder is None:  # not a folder name wandb writes: fall back to the file's time alone
        return WandbSegment(log, run_id, ("", 0, mtime))
    return WandbSegment(log, run_id, (folder[1], int(folder[2] or 0), mtime))


def wandb_segments(run_dir: str | Path) -> list[WandbSegment]:
    """Every ``run-*.wandb`` under ``<run_dir>/wandb``, oldest session first."""
    logs = Path(run_dir).glob("wandb/*run-*/run-*.wandb")
    return sorted((_segment(log) for log in logs), key=lambda s: s.order)


def newest_run_id(run_dir: str | Path) -> str | None:
    """The id of the run that wrote the newest session under ``<run_dir>/wandb``, else None."""
    segments = wandb_segments(run_dir)
    return segments[-1].run_id if segments else None


def newest_run_logs(run_dir: str | Path) -> list[Path]:
    """Every session file of the newest wandb run under ``<run_dir>/wandb``, oldest first.

    A run resumed with ``--ckpt_path last`` continues the same wandb run id in a new folder, so one run's history
    can span several files.
    """
    segments = wandb_segments(run_dir)
    if not segments:
        return []
    return [s.log for s in segments if s.run_id == segments[-1].run_id]
