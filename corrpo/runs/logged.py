"""A run's logged per-step scalars, read offline: the wandb transaction log, else a CSVLogger ``metrics.csv``.

Why: the per-step scalars (the RL reward, completion length, eval metrics) are only in the logger's files, and
``corrpo report``, the resume checks and the benchmarks read them without network or wandb login. The wandb
log ``wandb/*run-*/run-*.wandb`` is read with the wandb SDK's own offline reader, ``wandb leet inspect --json``
(wandb 0.31 has no Python reader any more, the old ``wandb.sdk.internal.datastore`` is gone: wandb-core reads
it). Every row is a dict of ``{key: value}`` with ``trainer/global_step``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from corrpo.runs.curves import STEP_KEY
from corrpo.runs.wandb_segments import newest_run_logs


def wandb_records(path: str | Path, timeout: float = 120.0) -> tuple[list[dict], str | None]:
    """Every record of a ``run-*.wandb`` file as a dict (``type``: history, summary, ...), and a note on any problem.

    Runs ``python -m wandb leet inspect --json <path>`` offline (``WANDB_MODE=offline`` also turns off its
    telemetry upload). A torn tail (an interrupted run) still gives the records before it, with a note; a wandb
    without ``leet inspect`` or an unreadable file gives no records and the reason.
    """
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], f"`wandb leet inspect` failed: {error}"
    records = []
    for line in done.stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    said = " ".join(done.stderr.split()[-40:])  # empty for a complete, readable log
    if done.returncode:
        return records, f"`wandb leet inspect` exited with {done.returncode}: {said}"
    return records, said or None


def wandb_history(path: str | Path, timeout: float = 120.0) -> tuple[list[dict], str | None]:
    """The ``history`` rows (``{key: value}``) of a ``run-*.wandb`` file, in order, and a note on any problem."""
    records, note = wandb_records(path, timeout)
    rows = [dict(r["history"].get("item", {})) for r in records if r.get("type") == "history" and "history" in r]
    return rows, note


def wandb_summary(path: str | Path, timeout: float = 120.0) -> dict:
    """The run summary at the end of a ``run-*.wandb`` file: every summary update merged in order."""
    summary: dict = {}
    for record in wandb_records(path, timeout)[0]:
        if record.get("type") == "summary":
            summary.update(record.get("summary", {}).get("update", {}))
    return summary


def find_wandb_logs(run_dir: str | Path) -> list[Path]:
    """Every ``run-*.wandb`` of the newest wandb run id under ``<run_dir>/wandb``, oldest first
    (:func:`corrpo.runs.wandb_segments.newest_run_logs`: a resumed run's history spans one file per session)."""
    return newest_run_logs(run_dir)


def find_wandb_log(run_dir: str | Path) -> Path | None:
    """The newest wandb run's newest ``run-*.wandb`` under ``<run_dir>/wandb`` (offline or online), else None."""
    logs = find_wandb_logs(run_dir)
    return logs[-1] if logs else None


def run_history(logs: list[Path]) -> tuple[list[dict], str | None]:
    """The history rows of a wandb run's segments (:func:`find_wandb_logs`: one per session of a resumed
    run), in order."""
    history, problems = [], []
    for part in logs:
        rows, problem = wandb_history(part)
        history.extend(rows)
        problems.extend([problem] if problem else [])
    return history, " ".join(problems) or None


def metrics_csv_history(run_dir: str | Path) -> tuple[list[dict], list[Path]]:
    """The rows of every CSVLogger ``metrics.csv`` in or below ``run_dir`` (not under wandb/ or checkpoints/), in
    path order (``version_0`` before ``version_1`` of a resumed run), as history rows: ``step`` becomes
    ``trainer/global_step``, empty cells are left out, numbers are floats. Also the files read."""
    skipped = {"wandb", "checkpoints"}
    paths = sorted(p for p in Path(run_dir).glob("**/metrics.csv") if not skipped & set(p.relative_to(run_dir).parts))
    rows = []
    for path in paths:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                out: dict = {}
                for key, cell in row.items():
                    try:
                        out[key] = float(cell) if cell not in (None, "") else None
                    except ValueError:
                        out[key] = cell
                out = {k: v for k, v in out.items() if v is not None}
                if "step" in out:
                    out[STEP_KEY] = int(out.pop("step"))
                rows.append(out)
    return rows, paths


@dataclass(frozen=True)
class Logged:
    """A run's logged per-step scalars: the history ``rows``, where they were read (``source``, Markdown; None
    when the folder holds no wandb run and no metrics.csv) and any ``problem`` reading them."""

    rows: list[dict]
    source: str | None
    problem: str | None = None


def logged_metrics(run_dir: str | Path) -> Logged:
    """The newest wandb run's history (every session of a resumed run), else the CSVLogger metrics.csv rows."""
    run_dir = Path(run_dir)
    logs = find_wandb_logs(run_dir)
    if logs:
        history, problem = run_history(logs)
        return Logged(history, ", ".join(f"`{part.relative_to(run_dir)}`" for part in logs), problem)
    rows, paths = metrics_csv_history(run_dir)
    return Logged(rows, ", ".join(f"`{p.relative_to(run_dir)}`" for p in paths) if paths else None)
