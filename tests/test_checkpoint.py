"""Crash-proof checkpoints: atomic saves in the checkpoint folder, and resume choosing a whole one of the right run."""

import errno
import os
import tempfile
import time

import pytest
import torch
import yaml

from callbacks.checkpoint import AtomicCheckpointIO, atomic_torch_save
from corrpo.runs.atomic import remove_leftovers
from corrpo.runs.resume import ResumeError, checkpoint_problem, config_differences, resume_point

CONFIG = {"model": {"rl": {"lr": 2e-5, "steps": 80}}, "trainer": {"default_root_dir": "runs/x", "max_steps": -1}}


def _run(root, name: str, config: dict | None = CONFIG):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def _ckpt(path, step: int, age: float):
    """A real torch checkpoint written ``age`` seconds ago (mtime decides which is newest)."""
    torch.save({"global_step": step, "w": torch.arange(1000.0)}, path)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def _corrupt(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if how == "zero-byte" else data[: len(data) // 2])


def test_an_atomic_save_writes_only_beside_the_target_never_in_tmpdir(tmp_path, monkeypatch):
    # Lightning's save staged the file in $TMPDIR and moved it (a truncating copy across filesystems): with an
    # unusable $TMPDIR it fails; the atomic save never looks there
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, target)
    assert torch.load(target, weights_only=True) == {"global_step": 3}
    assert os.listdir(target.parent) == ["last.ckpt"] and not (tmp_path / "no-such-tmpdir").exists()


def test_a_save_failing_mid_write_keeps_the_old_checkpoint_whole_and_removes_its_temp_file(tmp_path, monkeypatch):
    target = _ckpt(tmp_path / "last.ckpt", 2, age=0)
    before = target.read_bytes()
    real_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        real_save(obj, handle)  # bytes reach the temp file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"global_step": 4, "w": torch.ones(1000)}, target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


def test_the_temp_file_of_a_killed_save_is_removed_and_never_taken_for_a_checkpoint(tmp_path):
    run = _run(tmp_path, "20260101-000000")
    good = _ckpt(run / "checkpoints" / "last.ckpt", 2, age=10)
    orphan = run / "checkpoints" / f".last.ckpt.partial-{os.getpid()}"
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert resume_point(tmp_path, CONFIG) == (run, good)
    assert remove_leftovers(run / "checkpoints") == [orphan] and not orphan.exists()


@pytest.mark.parametrize("how", ["zero-byte", "truncated"])
def test_resume_skips_a_corrupt_newest_checkpoint_for_the_newest_whole_one_and_says_why(how, tmp_path):
    run = _run(tmp_path, "20260101-000000")
    good = _ckpt(run / "checkpoints" / "epoch=0-step=2.ckpt", 2, age=20)
    newest = _ckpt(run / "checkpoints" / "last.ckpt", 4, age=0)
    _corrupt(newest, how)
    reason = "is empty \\(0 bytes\\)" if how == "zero-byte" else "is truncated or corrupt"
    with pytest.warns(UserWarning, match=rf"skipping .*last\.ckpt: it {reason}"):
        assert resume_point(tmp_path, CONFIG) == (run, good)
    with pytest.warns(UserWarning, match="skipping"):
        assert resume_point(tmp_path) == (run, good)  # without a config to compare, too


def test_a_checkpoint_with_a_flipped_byte_fails_its_crc(tmp_path):
    path = _ckpt(tmp_path / "a.ckpt", 1, age=0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the archive opens, the CRC does not match
    path.write_bytes(bytes(data))
    assert "corrupt" in checkpoint_problem(path)
    assert checkpoint_problem(_ckpt(tmp_path / "b.ckpt", 1, age=0)) is None


def test_a_run_with_only_corrupt_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    run = _run(tmp_path, "20260101-000000")
    _corrupt(_ckpt(run / "checkpoints" / "last.ckpt", 4, age=0), "zero-byte")
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(ResumeError, match="none of its checkpoints"):
        resume_point(tmp_path, CONFIG)


def test_resume_takes_the_newest_run_of_the_same_config_not_the_newest_run(tmp_path):
    mine = _run(tmp_path, "20260101-000000")
    mine_ckpt = _ckpt(mine / "checkpoints" / "last.ckpt", 10, age=100)
    other_config = {"model": {"rl": {"lr": 1e-3, "steps": 40}}, "trainer": CONFIG["trainer"]}
    other = _run(tmp_path, "20260101-000100", other_config)
    _ckpt(other / "checkpoints" / "last.ckpt", 40, age=0)
    with pytest.warns(UserWarning, match=r"not resuming .*20260101-000100 \(its config differs: model\.rl\.lr"):
        assert resume_point(tmp_path, CONFIG) == (mine, mine_ckpt)


def test_no_run_of_the_same_config_is_an_error_listing_the_keys_and_how_to_name_a_run(tmp_path):
    other = _run(tmp_path, "20260101-000100", {"model": {"rl": {"lr": 1e-3, "steps": 40}}})
    _ckpt(other / "checkpoints" / "last.ckpt", 40, age=0)
    with pytest.raises(ResumeError) as info:
        resume_point(tmp_path, CONFIG)
    message = str(info.value)
    assert "model.rl.lr: 0.001 in the run, 2e-05 in this command" in message
    assert "model.rl.steps: 40 in the run, 80 in this command" in message
    assert "trainer.default_root_dir:" not in message and "trainer.max_steps" not in message
    assert f"--ckpt_path {other}" in message


def test_where_and_how_long_keys_may_differ_on_resume_and_nothing_else():
    def config(root: str, max_steps: int, dirpath, save_dir, run_id, seed: int) -> dict:
        logger = {"init_args": {"save_dir": save_dir, "id": run_id}}
        callbacks = [{"init_args": {"dirpath": dirpath}}]
        trainer = {"default_root_dir": root, "max_steps": max_steps, "callbacks": callbacks, "logger": logger}
        return {"trainer": trainer, "model": {"seed": seed}}

    saved = config("runs/a/1", 4, "runs/a/1/checkpoints", "runs/a/1", "abc", seed=0)
    current = config("runs/a", -1, None, None, None, seed=1)
    assert config_differences(saved, current) == [("model.seed", 0, 1)]


def test_a_config_saved_in_a_csv_loggers_version_folder_is_the_one_compared(tmp_path):
    run = _run(tmp_path, "20260101-000000", config=None)
    nested = run / "lightning_logs" / "version_0"
    nested.mkdir(parents=True)
    (nested / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt", 2, age=0)
    assert resume_point(tmp_path, CONFIG) == (run, ckpt)
    (nested / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "seed_everything": 7}))
    with pytest.raises(ResumeError, match="seed_everything: 7 in the run, '<unset>' in this command"):
        resume_point(tmp_path, CONFIG)


def _distributed_ckpt(path, age: float, shards: int = 2):
    """The layout ModelParallelStrategy (FSDP2) writes: a ``*.ckpt`` folder, one ``.distcp`` per rank, ``meta.pt``."""
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"index")
    for rank in range(shards):
        (path / f"__{rank}_0.distcp").write_bytes(b"shard")
    _ckpt(path / "meta.pt", 4, age=age)
    return path


def test_resume_takes_a_whole_distributed_checkpoint_and_skips_a_partial_one_saying_why(tmp_path):
    run = _run(tmp_path, "20260101-000000")
    good = _distributed_ckpt(run / "checkpoints" / "mid-7.ckpt", age=20)
    newest = _distributed_ckpt(run / "checkpoints" / "last.ckpt", age=0)
    assert checkpoint_problem(good) is None and resume_point(tmp_path, CONFIG) == (run, newest)
    (newest / "__1_0.distcp").write_bytes(b"")  # a kill during the save
    with pytest.warns(UserWarning, match=r"last\.ckpt: it is a distributed checkpoint with empty shards \(__1_0"):
        assert resume_point(tmp_path, CONFIG) == (run, good)
    (good / "meta.pt").unlink()
    assert "not a whole distributed checkpoint (no meta.pt)" in checkpoint_problem(good)


def test_a_key_newer_than_the_saved_config_is_no_difference_but_is_warned_and_a_changed_shape_still_is():
    saved = {"model": {"seed": 0, "rl": {"rewards": ["accuracy", "format"]}}}
    current = {"model": {"seed": 0, "system_prompt": None, "rl": {"entropy_coef": 0.0,
               "rewards": ["accuracy", {"function": "pkg:f"}]}}}  # fmt: skip
    with pytest.warns(UserWarning, match="predates these keys.*model.rl.entropy_coef=0.0.*model.system_prompt=None"):
        differences = config_differences(saved, current)
    assert differences == [
        ("model.rl.rewards[1]", "format", "<unset>"),
        ("model.rl.rewards[1].function", "<unset>", "pkg:f"),
    ]
