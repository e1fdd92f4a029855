"""One process per run folder: ``<run>/.run.lock``, created with ``O_EXCL`` and held for the run's life.

Two processes in one run folder corrupt it: a second ``corrpo fit ... --ckpt_path last`` started while the first
runs used to delete the live run's in-flight ``.partial-<pid>`` checkpoint as a "killed save", doubled
``eval_generations.jsonl`` rows and wrote a second wandb segment with the same id. So the CLI takes this lock on the
folder it chose (fresh or resumed) before anything touches it, and a second process is refused with a
:class:`RunLockedError` naming the live pid, host and start time.

The file holds ``{"pid", "host", "started", "proc_start", "argv"}``. A lock left by a process that died without
releasing it (SIGKILL, a power loss) is **stale** and taken over when its host is this host and its pid is not
alive, or is alive but started at another time (the pid was reused: ``proc_start`` from ``/proc/<pid>/stat``). A
lock from another host cannot be checked from here: it is refused, and the message says to delete the file if
that process is gone. Under DDP only the launching process (global rank 0) takes the lock: the other ranks are
its children or its torchrun peers in the same job, and they share it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".run.lock"
"""The lock's name inside a run folder."""


class RunLockedError(RuntimeError):
    """The run folder is in use by another live process (named in the message)."""


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command name, which may hold spaces


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _holder_alive(holder: dict) -> bool:
    """Whether the process in a lock file of THIS host still runs (a reused pid with another start time does not)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    recorded = holder.get("proc_start")
    return recorded is None or _proc_start(pid) in (None, recorded)


def _read(path: Path) -> dict | None:
    """The lock's record; None when it vanished; ``{}`` when unreadable (a holder killed mid-write: stale)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock of one run folder, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        """Create the lock file, or take over a stale one; :class:`RunLockedError` if a live process holds it."""
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "proc_start": _proc_start(os.getpid()), "argv": sys.argv[:8],
        }  # fmt: skip
        for _ in range(3):  # a stale lock removed by a racing process: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue
                self._refuse_unless_stale(holder)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            return self
        raise RunLockedError(f"{self.folder}: could not take {LOCK_FILE} (another process keeps re-creating it)")

    def _refuse_unless_stale(self, holder: dict) -> None:
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and pid == os.getpid():
            return  # this very process (a CLI built with run=False and never run, a notebook's earlier cell)
        if host not in (None, socket.gethostname()):
            raise RunLockedError(
                f"run folder {self.folder} is in use by pid {pid} on host {host} (since {holder.get('started')}): "
                f"one process per run folder. If that process is gone, delete {self.path}"
            )
        if holder and _holder_alive(holder):
            raise RunLockedError(
                f"run folder {self.folder} is in use by pid {pid} (since {holder.get('started')}, "
                f"{' '.join(map(str, holder.get('argv') or []))[:120]}): one process per run folder; wait for it "
                "to finish or stop it (SIGTERM saves a checkpoint), then resume"
            )

    def release(self) -> None:
        """Delete the lock file if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder is not None and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def hold_run_lock(folder: str | os.PathLike) -> RunLock | None:
    """Take ``folder``'s lock in the process that holds it for the job (:func:`is_lock_holder_rank`; None on the
    other ranks), released at interpreter exit at the latest (a killed process leaves a stale lock)."""
    if not is_lock_holder_rank():
        return None
    lock = RunLock(folder).acquire()
    atexit.register(lock.release)
    return lock


def is_lock_holder_rank() -> bool:
    """Whether this process takes the run lock: global rank 0 of a torchrun / SLURM job, or the launching process
    of Lightning's DDP (its children have ``LOCAL_RANK`` > 0)."""
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key, "0") != "0":
            return False
    return True
