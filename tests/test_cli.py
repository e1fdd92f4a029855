"""Every shipped config parses; bad keys and values are rejected, by name, before any training."""

from pathlib import Path

import pytest
import yaml
from conftest import run_tiny

from corrpo.cli import build_cli, new_run_folder

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_with_print_config(config, capsys):
    subcommand = "validate" if "fingerprint" in config.name else "fit"
    with pytest.raises(SystemExit) as exit_info:
        build_cli([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["policy"]
    if subcommand == "fit":
        # the phase lengths are linked from the model to the data: set once, under model
        assert "sft_steps" not in printed["data"] and "rl_steps" not in printed["data"]
        assert printed["model"]["sft"]["steps"] + printed["model"]["rl"]["steps"] > 0


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.sft.stepz=3", "stepz"),
        ("--model.rl.num_generations=eight", "num_generations"),
        ("--model.rl.loss_type=ppo", "loss_type"),
        ("--data.on_error=ignore", "on_error"),
    ],
)
def test_bad_keys_and_values_fail_before_training(override, named, capsys, tmp_path):
    tiny = [c for c in CONFIGS if c.name == "tiny.yaml"][0]
    with pytest.raises((SystemExit, ValueError)) as info:
        build_cli(["fit", "--config", str(tiny), override, f"--trainer.default_root_dir={tmp_path}"])
    message = str(info.value) + capsys.readouterr().err
    assert named in message
    assert not list(tmp_path.rglob("*.ckpt"))


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr("corrpo.cli.time.strftime", lambda _: "20261127-095031")
    folders = [new_run_folder(tmp_path / "runs") for _ in range(3)]
    assert [f.name for f in folders] == ["20261127-095031", "20261127-095031-1", "20261127-095031-2"]
    assert all(f.is_dir() for f in folders)


def test_a_run_that_cannot_be_built_leaves_no_empty_run_folder(tmp_path, capsys):
    root = tmp_path / "runs"
    with pytest.raises(ValueError, match="model.policy: no such folder"):
        build_cli(["fit", "--config", str(CONFIGS[0].parent / "tiny.yaml"), "--model.policy", str(tmp_path / "nope"),
                   f"--trainer.default_root_dir={root}"])  # fmt: skip
    assert root.is_dir() and not any(root.iterdir())


def test_accumulate_grad_batches_names_the_micro_batch_keys(tmp_path):
    with pytest.raises(SystemExit, match=r"model\.sft\.micro_batch_size and model\.rl\.micro_batch_size"):
        run_tiny(tmp_path, "--trainer.accumulate_grad_batches=2")
