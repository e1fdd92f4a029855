"""Exact resume: N steps in one go == N/2 steps, stop, ``--ckpt_path last``, the other N/2 (weights, curve)."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import run_tiny

from callbacks.checkpoint import StreamingCheckpointIO
from corrpo.cli import resume_point
from corrpo.wandb_segments import wandb_segments

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
    assert isinstance(first.trainer.strategy.checkpoint_io, StreamingCheckpointIO)  # no in-memory copy when saving
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
    old = tmp_path / "20260101-000000" / "checkpoints" / "last.ckpt"
    old.write_bytes(b"")
    assert resume_point(tmp_path) == (tmp_path / "20260101-000000", old)


def test_the_report_of_a_resumed_run_reads_both_wandb_segments(runs):
    from corrpo.report import find_wandb_logs, reward_curve, run_history

    whole, _, _, second = runs
    split_dir, whole_dir = Path(second.trainer.default_root_dir), Path(whole.trainer.default_root_dir)
    assert len(find_wandb_logs(split_dir)) == 2
    curve_split = sorted(dict(reward_curve(run_history(find_wandb_logs(split_dir))[0])).items())
    curve_whole = sorted(dict(reward_curve(run_history(find_wandb_logs(whole_dir))[0])).items())
    assert curve_whole and [s for s, _ in curve_split] == [s for s, _ in curve_whole]
    assert [r for _, r in curve_split] == pytest.approx([r for _, r in curve_whole], abs=1e-6)
