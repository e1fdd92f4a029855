"""RunFolder: the one owner of a run folder's files; what its writers write, its readers read back."""

from __future__ import annotations

import math

import pytest

from corrpo.runs.run_folder import EMERGENCE_COLUMNS, RunFolder, find_runs, newest_finished_run


def row(batches: int, event: str, rho: float) -> dict:
    return dict(step=batches, batches=batches, phase="sft", event=event, source="reference", spearman=rho,
                pearson=rho, strength=-rho, n_tokens=10)  # fmt: skip


def test_writers_and_readers_round_trip(tmp_path):
    run = RunFolder(tmp_path / "runs" / "20260101-000000")
    assert not run.is_run() and run.read_results() == {} and run.read_config() == {}
    run.write_emergence([row(0, "start", 0.1), row(4, "end", -0.2)])
    frame = run.read_emergence()
    assert list(frame.columns) == EMERGENCE_COLUMNS and frame["spearman"].tolist() == [0.1, -0.2]
    run.write_results({"test_accuracy": [{"when": "end", "step": 4, "accuracy": 0.5}], "skipped_updates": 0})
    run.tag_results(method="grpo", seed=1)
    assert run.read_results()["method"] == "grpo" and run.read_results()["skipped_updates"] == 0
    assert run.test_accuracy("end") == 0.5 and math.isnan(run.test_accuracy("sft_end"))
    run.config.write_text("model:\n  rl:\n    steps: 3\n")
    assert run.read_config()["model"]["rl"]["steps"] == 3 and run.is_run()


def test_a_missing_curve_names_its_path_and_an_unreadable_result_warns(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="emergence.csv not found"):
        run.read_emergence()
    run.results.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert run.read_results() == {}


def test_a_parent_folder_expands_to_its_runs_and_the_newest_finished_one_is_found(tmp_path):
    older, newer, unfinished = (RunFolder(tmp_path / name) for name in ("20260101-000000", "20260102-000000", "x"))
    for run in (older, newer, unfinished):
        run.write_emergence([row(0, "start", 0.0)])
    older.write_results({})
    newer.write_results({})
    assert find_runs([tmp_path]) == [older, newer, unfinished]
    assert find_runs([older.path]) == [older]
    assert newest_finished_run(tmp_path) == newer
    assert newest_finished_run(tmp_path, exclude={newer.path}) == older
    assert newest_finished_run(tmp_path / "absent") is None
