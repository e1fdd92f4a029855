"""Exact resume: N steps in one go == N/2 steps, stop, ``--ckpt_path last``, the other N/2 (weights, curve)."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_FAST_ARGS, run_tiny

from callbacks.checkpoint import AtomicCheckpointIO
from corrpo.cli import ResumeError, resume_point
from corrpo.runs.wandb_segments import wandb_segments

# Both phases, with an RL phase that really moves the weights (the CorR-PO bonus gives every group reward
# variance even when the tiny model answers nothing right) and sampling that draws from the RNG.
STEPS = ["--model.sft.steps=3", "--model.rl.steps=5", "--model.rl.inversion.coef=0.5", "--model.rl.lr=1e-3"]
STOP_AT = 4  # 3 SFT steps + 1 RL step: stopped inside the RL phase


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole = run_tiny(tmp_path_factory.mktemp("whole"), *STEPS)
    root = tmp_path_factory.mktemp("split")
    first = run_tiny(root, *STEPS, f"--trainer.max_steps={STOP_AT}")
    checkpoint = torch.load(
        Path(first.trainer.default_root_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    second = run_tiny(root, *STEPS, "--ckpt_path=last")
    return whole, first, checkpoint, second


def _rows(cli) -> list[dict]:
    return list(csv.DictReader((Path(cli.trainer.default_root_dir) / "emergence.csv").open()))


def test_the_stopped_run_checkpoints_where_it_stopped_inside_the_rl_phase(runs):
    _, first, checkpoint, _ = runs
    assert checkpoint["global_step"] == STOP_AT
    assert checkpoint["corrpo"]["steps_done"] == STOP_AT
    assert first.model.schedule.phase_at(checkpoint["corrpo"]["steps_done"]) == "rl"
    assert first.model.steps_done == STOP_AT < first.model.schedule.total


def test_the_checkpoint_inside_the_rl_phase_holds_one_optimizer_state(runs):
    _, first, checkpoint, _ = runs
    assert isinstance(first.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # no in-memory copy when saving
    assert not list((Path(first.trainer.default_root_dir) / "checkpoints").glob("*.partial"))
    sft_state, rl_state = (opt["state"] for opt in checkpoint["optimizer_states"])
    assert sft_state == {}, "the SFT AdamW moments are released at the SFT -> RL boundary"
    assert rl_state and all("exp_avg" in s for s in rl_state.values())


def test_the_resumed_run_continues_in_the_same_folder_at_the_next_step(runs):
    _, first, _, second = runs
    assert second.trainer.default_root_dir == first.trainer.default_root_dir
    assert second.model.steps_done == second.model.schedule.total == 8
    assert second.trainer.global_step == 8
    assert [e["when"] for e in second.model.eval_history] == ["start", "sft_end", "end"]
    # one wandb run, continued: both offline folders carry the same run id
    segments = wandb_segments(second.trainer.default_root_dir)
    assert len(segments) == 2 and len({s.run_id for s in segments}) == 1


def test_split_and_uninterrupted_runs_end_with_the_same_weights(runs):
    whole, first, _, second = runs
    a, b = whole.model.policy.state_dict(), second.model.policy.state_dict()
    moved = max((a[k] - first.model.policy.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-4, "the steps after the stop must change the weights, or equality proves nothing"
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_split_and_uninterrupted_runs_write_the_same_emergence_csv(runs):
    whole, _, _, second = runs
    rows_whole, rows_split = _rows(whole), _rows(second)
    assert [(r["step"], r["event"], r["phase"]) for r in rows_split] == [
        (r["step"], r["event"], r["phase"]) for r in rows_whole
    ]
    for x, y in zip(rows_whole, rows_split, strict=True):
        for key in ("spearman", "pearson", "strength"):
            assert float(x[key]) == pytest.approx(float(y[key]), abs=1e-6)
    assert rows_split[-1]["event"] == "end" and rows_split[-1]["batches"] == "8"


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(tmp_path):
    assert resume_point(tmp_path) is None
    (tmp_path / "20260101-000000" / "checkpoints").mkdir(parents=True)
    assert resume_point(tmp_path) is None


def test_the_report_of_a_resumed_run_reads_both_wandb_segments(runs):
    from corrpo.runs.report import find_wandb_logs, reward_curve, run_history

    whole, _, _, second = runs
    split_dir, whole_dir = Path(second.trainer.default_root_dir), Path(whole.trainer.default_root_dir)
    assert len(find_wandb_logs(split_dir)) == 2
    curve_split = sorted(dict(reward_curve(run_history(find_wandb_logs(split_dir))[0])).items())
    curve_whole = sorted(dict(reward_curve(run_history(find_wandb_logs(whole_dir))[0])).items())
    assert curve_whole and [s for s, _ in curve_split] == [s for s, _ in curve_whole]
    assert [r for _, r in curve_split] == pytest.approx([r for _, r in curve_whole], abs=1e-6)


# ------------------------------------------------------------------------------------ signals, wrong runs
def _signal_at(step: int, signum: int) -> str:
    init_args = f'{{"step": {step}, "signum": {int(signum)}}}'
    return f'--trainer.callbacks+={{"class_path": "fault_callbacks.SignalAt", "init_args": {init_args}}}'


def _max_weight_diff(a, b) -> float:
    a, b = a.model.policy.state_dict(), b.model.policy.state_dict()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sigint_saves_at_the_step_boundary_exits_130_and_the_resumed_run_equals_the_uninterrupted_one(runs, tmp_path):
    whole = runs[0]
    ctrl_c = _signal_at(STOP_AT - 1, signal.SIGINT)  # arrives during step 3: the checkpoint is taken after it
    with pytest.raises(SystemExit) as info:
        run_tiny(tmp_path, *STEPS, ctrl_c)
    assert info.value.code == 130
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["corrpo"]["steps_done"] == STOP_AT and not (run / "results.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    resumed = run_tiny(tmp_path, *STEPS, ctrl_c, "--ckpt_path=last")
    assert Path(resumed.trainer.default_root_dir) == run and resumed.model.steps_done == 8
    assert _max_weight_diff(whole, resumed) == 0.0


def test_sigterm_saves_at_the_step_boundary_and_exits_143(tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), *TINY_FAST_ARGS, *STEPS,
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            _signal_at(1, signal.SIGTERM)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SERVICE", None)  # its own wandb service, as a scheduler's job would have, not this process's
    done = subprocess.run([sys.executable, "-m", "corrpo.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "SIGTERM received: saving a checkpoint" in done.stdout
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["corrpo"]["steps_done"] == 2 and checkpoint["global_step"] == 2
    assert not (run / "results.json").exists() and not (run / "policy").exists()


def test_a_run_of_another_config_is_never_resumed_and_its_config_yaml_is_untouched(runs, tmp_path):
    whole = runs[0]
    first = run_tiny(tmp_path, *STEPS, "--trainer.max_steps=2")  # run A, stopped
    other = run_tiny(tmp_path, "--model.sft.steps=2", "--model.rl.steps=1")  # run B, finished later
    run_a, run_b = Path(first.trainer.default_root_dir), Path(other.trainer.default_root_dir)
    saved = {run: (run / "config.yaml").read_bytes() for run in (run_a, run_b)}
    with pytest.raises(ResumeError) as info:  # a third config: neither run is its run
        run_tiny(tmp_path, *STEPS, "--model.rl.lr=3e-3", "--ckpt_path=last")
    assert "model.rl.lr: 0.001 in the run, 0.003 in this command" in str(info.value)
    assert sorted(p for p in tmp_path.iterdir() if p.is_dir()) == sorted([run_a, run_b])  # no new folder
    with pytest.warns(UserWarning, match=rf"not resuming {run_b}"):
        resumed = run_tiny(tmp_path, *STEPS, "--ckpt_path=last")  # A's command: A, although B is newer
    assert Path(resumed.trainer.default_root_dir) == run_a
    assert {run: (run / "config.yaml").read_bytes() for run in (run_a, run_b)} == saved
    assert _max_weight_diff(whole, resumed) == 0.0
