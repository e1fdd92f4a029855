"""``--trainer.fast_dev_run`` is a smoke test of the whole run: a batch of each phase (so the rollout, the rewards and
the RL update run), the inversion probe once, no checkpoint; Lightning's own would run the first SFT batch only."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_tiny

from corrpo.training.phases import PhaseSchedule


def tracker_rows(cli) -> list[dict]:
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InversionTracker").rows


def test_fast_dev_run_runs_one_sft_and_one_rl_batch_and_the_probe_once(tmp_path):
    cli = run_tiny(tmp_path, "--trainer.fast_dev_run=true")
    assert cli.model.schedule == PhaseSchedule(1, 1) and cli.model.steps_done == 2
    logged = set(cli.trainer.callback_metrics)
    assert {"sft/loss", "rl/reward", "rl/loss", "rl/rewards/accuracy/mean"} <= logged
    assert [row["event"] for row in tracker_rows(cli)] == ["end"]
    run = Path(cli.trainer.default_root_dir)
    assert not list(run.rglob("*.ckpt"))  # Lightning's fast_dev_run saves no checkpoint
    results = json.loads((run / "results.json").read_text())
    assert results["fast_dev_run"] is True and results["stopped_early"] is False
    assert results["steps_run"] == {"sft": 1, "rl": 1} and results["method"] == "grpo"


def test_fast_dev_run_n_of_an_rl_only_run_runs_n_rl_batches(tmp_path):
    cli = run_tiny(tmp_path, "--trainer.fast_dev_run=2", "--model.sft.steps=0")
    assert cli.model.schedule == PhaseSchedule(0, 2) and cli.model.steps_done == 2
    logged = set(cli.trainer.callback_metrics)
    assert "rl/reward" in logged and not any(key.startswith("sft/") for key in logged)
