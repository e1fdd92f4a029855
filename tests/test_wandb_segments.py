"""Which wandb session files belong to a run, and in which order: the folder names wandb really writes."""

from pathlib import Path

from corrpo.runs.wandb_segments import newest_run_id, newest_run_logs, wandb_segments


def _session(run_dir: Path, folder: str, run_id: str) -> Path:
    log = run_dir / "wandb" / folder / f"run-{run_id}.wandb"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"")
    return log


def test_a_resume_within_the_same_second_is_a_second_session_of_the_same_run(tmp_path):
    # wandb adds "-1" to the folder when a session of the same id already started in that second
    first = _session(tmp_path, "offline-run-20261127_095031-0rr03kpu", "0rr03kpu")
    second = _session(tmp_path, "offline-run-20261127_095031-0rr03kpu-1", "0rr03kpu")
    third = _session(tmp_path, "offline-run-20261127_095031-0rr03kpu-2", "0rr03kpu")
    assert newest_run_id(tmp_path) == "0rr03kpu"
    assert newest_run_logs(tmp_path) == [first, second, third]


def test_sessions_are_ordered_by_their_time_and_only_the_newest_run_is_kept(tmp_path):
    newer = _session(tmp_path, "run-20261127_100000-bbbbbbbb", "bbbbbbbb")
    _session(tmp_path, "offline-run-20261127_090000-aaaaaaaa", "aaaaaaaa")
    older = _session(tmp_path, "offline-run-20261127_095959-bbbbbbbb", "bbbbbbbb")
    assert [s.run_id for s in wandb_segments(tmp_path)] == ["aaaaaaaa", "bbbbbbbb", "bbbbbbbb"]
    assert newest_run_logs(tmp_path) == [older, newer]


def test_a_user_chosen_run_id_with_dashes_is_read_whole(tmp_path):
    log = _session(tmp_path, "offline-run-20261127_095031-my-run-7", "my-run-7")
    assert newest_run_id(tmp_path) == "my-run-7"
    assert newest_run_logs(tmp_path) == [log]


def test_no_wandb_folder_means_no_run(tmp_path):
    assert newest_run_id(tmp_path) is None and newest_run_logs(tmp_path) == []
