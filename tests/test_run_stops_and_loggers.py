"""A run stopped before RL says so and records what it ran; a CSV logger leaves the run folder's layout as it is,
also across a resume; every metrics row holds its own phase's keys only.

One shrunk run with a CSVLogger as its only logger (so no wandb folder decides anything), stopped by
``trainer.max_steps`` inside SFT, then resumed with ``--ckpt_path last`` to the end.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_tiny

from corrpo.training.phases import PhaseSchedule

CSV_LOGGER = (
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.save_dir=.",  # the CLI puts it in the run folder
    "--trainer.logger.name=tiny",
    "--trainer.log_every_n_steps=1",
)
STOP_AT = 4  # of TINY_FAST_ARGS' 6 SFT steps: RL never runs


@pytest.fixture(scope="module")
def stopped_then_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.warns(UserWarning, match=r"the run stopped after 4 of 6 SFT steps; RL never ran \(trainer.max_steps=4"):
        first = run_tiny(root, *CSV_LOGGER, f"--trainer.max_steps={STOP_AT}")
    run = Path(first.trainer.default_root_dir)
    stopped_results = json.loads((run / "results.json").read_text())
    second = run_tiny(root, *CSV_LOGGER, "--ckpt_path=last")
    assert Path(second.trainer.default_root_dir) == run
    return run, stopped_results, second


def test_a_run_stopped_before_rl_records_sft_only_and_the_steps_it_ran(stopped_then_resumed):
    _, stopped, _ = stopped_then_resumed
    assert stopped["method"] == "sft-only" and stopped["stopped_early"] is True
    assert stopped["steps_run"] == {"sft": STOP_AT, "rl": 0} and stopped["steps_planned"] == {"sft": 6, "rl": 3}


def test_the_resumed_run_records_the_method_and_every_step(stopped_then_resumed):
    run, _, second = stopped_then_resumed
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "grpo" and results["stopped_early"] is False
    assert results["steps_run"] == {"sft": 6, "rl": 3} and second.model.steps_done == 9


def metrics_rows(run: Path) -> list[dict]:
    """Every session's metrics.csv rows (the resumed session's logger starts ``version_1``), empty cells dropped."""
    rows = []
    for path in sorted(run.glob("tiny/version_*/metrics.csv")):
        rows += [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]
    return rows


def test_a_csv_logger_leaves_the_run_files_at_the_top_of_the_run_folder_across_a_resume(stopped_then_resumed):
    run, _, _ = stopped_then_resumed
    for name in ("config.yaml", "results.json", "emergence.csv", "policy", "checkpoints"):
        assert (run / name).exists(), name
    # the logger's own files in its version folders (one per session), none of the run's files there
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("tiny/*")) == ["tiny/version_0", "tiny/version_1"]
    assert sorted(p.name for p in run.glob("tiny/*/*")) == ["hparams.yaml"] * 2 + ["metrics.csv"] * 2
    assert not [p for p in run.iterdir() if p.name.startswith("version_")]


def test_each_metrics_row_holds_only_its_own_phases_keys(stopped_then_resumed):
    run, _, _ = stopped_then_resumed
    rows = metrics_rows(run)
    sft_rows = [r for r in rows if any(k.startswith("sft/") for k in r)]
    rl_rows = [r for r in rows if any(k.startswith("rl/") for k in r)]
    assert len(sft_rows) == 6 and len(rl_rows) == 3  # one row per step (log_every_n_steps=1)
    assert all(float(r["phase"]) == 0.0 and not any(k.startswith("rl/") for k in r) for r in sft_rows)
    assert all(float(r["phase"]) == 1.0 and not any(k.startswith("sft/") for k in r) for r in rl_rows)


def test_a_run_stopped_by_ctrl_c_before_rl_says_so_and_writes_no_results(tmp_path):
    ctrl_c = '--trainer.callbacks+={"class_path": "fault_callbacks.SignalAt", "init_args": {"step": 1, "signum": 2}}'
    with pytest.raises(SystemExit) as info:
        with pytest.warns(UserWarning, match=r"the run stopped after 2 of 6 SFT steps; RL never ran \(interrupted\)"):
            run_tiny(tmp_path, "--trainer.logger=false", ctrl_c)
    assert info.value.code == 130
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not (run / "results.json").exists()  # resumable: not a finished run


def test_the_schedule_says_how_far_a_stopped_run_got():
    schedule = PhaseSchedule(sft_steps=6, rl_steps=3)
    assert schedule.stop_note(4) == "the run stopped after 4 of 6 SFT steps; RL never ran"
    assert schedule.stop_note(7) == "the run stopped after 1 of 3 RL steps"
    assert schedule.stop_note(9) is None and schedule.steps_run(7) == {"sft": 6, "rl": 1}
    assert PhaseSchedule(6, 0).stop_note(2) == "the run stopped after 2 of 6 SFT steps"
