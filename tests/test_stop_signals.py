"""Signals that always work: a step that cannot end (a hung reward) is stopped by a second signal or the grace period,
and the last step boundary is saved so that ``--ckpt_path last`` continues exactly."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import run_tiny

from callbacks.checkpoint import ResumableCheckpoint
from callbacks.step_boundary import StopNow

STEPS = ["--model.sft.steps=2", "--model.rl.steps=3", "--model.rl.inversion.coef=0.5", "--model.rl.lr=1e-3",
         "--model.rl.rewards=[accuracy, fault_rewards:hang_once]"]  # fmt: skip
HANG_STEP = 3  # the second RL batch: not the SFT -> RL boundary


@pytest.fixture
def handlers():
    callback = ResumableCheckpoint(stop_grace_s=0.3)
    previous = {s: signal.signal(s, callback._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    yield callback
    callback._previous_handlers = previous
    callback._restore_signal_handlers()


def test_the_grace_period_after_a_sigterm_stops_a_step_that_does_not_end(handlers):
    os.kill(os.getpid(), signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(StopNow) as info:
        time.sleep(30)  # a hung reward
    assert info.value.code == 143 and time.monotonic() - start < 5


def test_a_second_signal_stops_the_step_at_once(handlers):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(StopNow) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    assert info.value.code == 130  # the first signal's code


def test_a_grace_period_that_is_not_a_positive_number_is_refused():
    with pytest.raises(ValueError, match="stop_grace_s must be a positive number"):
        ResumableCheckpoint(stop_grace_s=float("nan"))


def test_a_hung_reward_stopped_by_a_second_sigterm_saves_the_last_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    mark = tmp_path / "hung"
    monkeypatch.setenv("CORRPO_HANG_MARK", str(mark))
    monkeypatch.setenv("CORRPO_HANG_STEP", str(HANG_STEP))
    monkeypatch.setenv("CORRPO_HANG_SIGNALS", "2")
    root = tmp_path / "runs"
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        run_tiny(root, *STEPS)
    assert info.value.code == 143 and mark.exists() and time.monotonic() - start < 120
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["corrpo"]["steps_done"] == HANG_STEP and not (run / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    resumed = run_tiny(root, *STEPS, "--ckpt_path=last")  # the mark exists: the reward no longer hangs
    assert Path(resumed.trainer.default_root_dir) == run and resumed.model.steps_done == 5
    whole = run_tiny(tmp_path / "whole", *STEPS)
    a, b = whole.model.policy.state_dict(), resumed.model.policy.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert (run / "emergence.csv").read_text() == (Path(whole.trainer.default_root_dir) / "emergence.csv").read_text()
