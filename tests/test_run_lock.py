"""One process per run folder: a live holder is refused by pid, a dead or reused pid's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_tiny

from corrpo.runs.lock import LOCK_FILE, RunLock, RunLockedError, _proc_start


@pytest.fixture
def live_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def _write_lock(folder: Path, pid: int, host: str | None = None, proc_start: str | None = None) -> None:
    start = proc_start if proc_start is not None else _proc_start(pid)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2025-01-01 00:00:00",
              "proc_start": start, "argv": ["corrpo", "fit"]}  # fmt: skip
    (folder / LOCK_FILE).write_text(json.dumps(record))


def test_a_folder_held_by_a_live_process_is_refused_naming_its_pid(tmp_path, live_process):
    _write_lock(tmp_path, live_process.pid)
    with pytest.raises(RunLockedError, match=rf"in use by pid {live_process.pid} .*one process per run folder"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_process.pid  # left alone


def test_the_lock_of_a_dead_process_is_stale_and_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(tmp_path, int(dead.stdout), proc_start="1")
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times are read from /proc")
def test_a_reused_pid_with_another_start_time_is_stale(tmp_path, live_process):
    _write_lock(tmp_path, live_process.pid, proc_start="1")  # the pid is alive, but not the process that locked
    RunLock(tmp_path).acquire().release()


def test_a_lock_from_another_host_is_refused_saying_to_delete_it_if_that_process_is_gone(tmp_path):
    _write_lock(tmp_path, 1, host="other-node-17", proc_start="1")
    with pytest.raises(RunLockedError, match=r"pid 1 on host other-node-17.*delete .*\.run\.lock"):
        RunLock(tmp_path).acquire()


def test_resuming_a_live_run_is_refused_before_it_touches_anything_and_a_finished_run_leaves_no_lock(
    tmp_path, live_process
):
    first = run_tiny(tmp_path, "--model.sft.steps=2", "--model.rl.steps=1", "--trainer.max_steps=2")
    run = Path(first.trainer.default_root_dir)
    assert not (run / LOCK_FILE).exists()  # released when the run ended
    in_flight = run / "checkpoints" / f".last.ckpt.partial-{live_process.pid}"  # the live run's save in progress
    in_flight.write_bytes(b"half a checkpoint")
    config, last = (run / "config.yaml").read_bytes(), torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    _write_lock(run, live_process.pid)
    with pytest.raises(RunLockedError, match=rf"run folder {run} is in use by pid {live_process.pid}"):
        run_tiny(tmp_path, "--model.sft.steps=2", "--model.rl.steps=1", "--ckpt_path=last")
    assert in_flight.read_bytes() == b"half a checkpoint" and (run / "config.yaml").read_bytes() == config
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == last["global_step"]
    assert sorted(p for p in tmp_path.iterdir() if p.is_dir()) == [run]  # no fresh folder either
