"""Continue and extend on purpose (issue 28 items 5 and 6): ``--extend``, ``--resume_may_differ`` recorded in
config.yaml, ``--ckpt_path <file>`` compared with the command (never loaded over it), the code version recorded,
validate / test writing nothing into the run they read, and a broken config.yaml never blocking another run."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_ARCH, run_tiny

from corrpo.module import CorrPOModule
from corrpo.runs.code_version import code_version
from corrpo.runs.continuation import allowed_changes, check_listed_keys, check_schedule, checkpoint_differences
from corrpo.runs.resume import ResumeError, key_allowed, resume_point
from corrpo.trainer_state import reopen_finished_epoch
from corrpo.training.config import RLConfig, SFTConfig

# RL that moves the weights (the CorR-PO bonus gives every group reward variance) and samples from the RNG
STEPS = ["--model.sft.steps=2", "--model.rl.inversion.coef=0.5", "--model.rl.lr=1e-3"]


def _weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in cli.model.policy.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A finished 2 SFT + 2 RL run extended to 4 RL steps, and an uninterrupted 2 + 4 run."""
    root = tmp_path_factory.mktemp("extended")
    short = run_tiny(root, *STEPS, "--model.rl.steps=2")
    run = Path(short.trainer.default_root_dir)
    before = {"config": (run / "config.yaml").read_text(), "results": json.loads((run / "results.json").read_text())}
    more = run_tiny(root, *STEPS, "--model.rl.steps=4", "--ckpt_path=last", "--extend=true")
    whole = run_tiny(tmp_path_factory.mktemp("whole"), *STEPS, "--model.rl.steps=4")
    before["whole_emergence"] = (Path(whole.trainer.default_root_dir) / "emergence.csv").read_text()
    return run, before, _weights(more), more, _weights(whole)


# ------------------------------------------------------------------------------------------------- extend
def test_an_extended_run_ends_with_the_weights_of_an_uninterrupted_run_of_the_new_length(extended):
    run, _, weights, more, whole = extended
    assert Path(more.trainer.default_root_dir) == run and more.model.steps_done == 6
    assert _max_diff(weights, whole) == 0.0


def test_an_extended_run_measures_the_inversion_where_an_uninterrupted_run_does(extended):
    run, before, _, _, _ = extended  # step 4, the old end, is a periodic point of the longer run: measured on resume
    assert (run / "emergence.csv").read_text() == before["whole_emergence"]


def test_an_extension_is_recorded_in_config_yaml_with_the_old_step_count(extended):
    run, before, _, _, _ = extended
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert yaml.safe_load(before["config"])["model"]["rl"]["steps"] == 2
    assert saved["model"]["rl"]["steps"] == 4
    (entry,) = saved["resumed_with_changes"]
    assert entry["changes"] == {"model.rl.steps": {"old": 2, "new": 4}} and entry["steps_done"] == 4
    assert saved["code_version"] == yaml.safe_load(before["config"])["code_version"] == code_version()  # the start's


def test_results_json_records_the_code_version_and_the_extended_steps(extended):
    run, before, _, _, _ = extended
    results = json.loads((run / "results.json").read_text())
    assert before["results"]["steps_run"] == {"sft": 2, "rl": 2}
    assert results["steps_run"] == {"sft": 2, "rl": 4}
    assert results["code_version"] == code_version() and results["code_version"]["corrpo"]


def test_a_changed_step_count_without_extend_is_refused_naming_the_key_and_the_way_to_extend(extended):
    run = extended[0]
    with pytest.raises(ResumeError, match=r"(?s)model\.rl\.steps: 4 in the run, 6 in this command.*--extend true"):
        run_tiny(run.parent, *STEPS, "--model.rl.steps=6", "--ckpt_path=last")


def test_extend_refuses_fewer_steps(extended):
    run = extended[0]
    with pytest.raises(ResumeError, match=r"model\.rl\.steps would shrink from 4 to 3"):
        run_tiny(run.parent, *STEPS, "--model.rl.steps=3", "--ckpt_path=last", "--extend=true")


def test_the_sft_phase_cannot_change_length_after_it_ended():
    with pytest.raises(ResumeError, match=r"model\.sft\.steps cannot change from 2 to 3"):
        check_schedule({"model": {"sft": {"steps": 2}, "rl": {"steps": 2}}},
                       {"model": {"sft": {"steps": 3}, "rl": {"steps": 2}}}, 3, "the run")  # fmt: skip
    check_schedule({"model": {"sft": {"steps": 4}}}, {"model": {"sft": {"steps": 6}}}, 3, "the run")  # SFT running


def test_a_finished_checkpoint_is_reopened_only_when_steps_are_left():
    checkpoint = {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": True}}}}
    reopen_finished_epoch(checkpoint, steps_done=4, total_steps=4)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] is True
    reopen_finished_epoch(checkpoint, steps_done=4, total_steps=6)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] is False


def test_the_module_reopens_a_final_checkpoint_whatever_the_checkpoint_callback():
    """The reopening lives in CorrPOModule.on_load_checkpoint, so --extend also works with a plain ModelCheckpoint."""
    module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, sft=SFTConfig(steps=2), rl=RLConfig(steps=4), seed=0)
    finished = {
        "corrpo": {"steps_done": 4},
        "loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": True}}},
    }
    module.on_load_checkpoint(finished)
    assert module.steps_done == 4
    assert finished["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] is False  # 2 of 6 steps left


# --------------------------------------------------------------------------------- deliberate changes
def test_a_listed_key_allows_everything_below_it_and_globs():
    assert key_allowed("model.rl.rewards[1]", ["model.rl.rewards"])
    assert key_allowed("model.rl.rewards[0].kwargs.x", ["model.rl.rewards"])
    assert key_allowed("model.rl.lr", ["model.rl.*"]) and not key_allowed("model.rl.lr", ["model.rl.rewards"])
    assert not key_allowed("model.rl.rewards_x", ["model.rl.rewards"])


def test_allowed_changes_are_those_listed_with_their_old_and_new_values():
    saved = {"model": {"rl": {"rewards": ["accuracy"], "lr": 1e-3}}}
    command = {"model": {"rl": {"rewards": ["accuracy", "format"], "lr": 1e-3}}}
    assert allowed_changes(saved, command, False, ["model.rl.rewards"]) == [
        ("model.rl.rewards[1]", "<unset>", "format")
    ]


def test_a_misspelt_key_in_resume_may_differ_is_an_error_naming_it():
    with pytest.raises(ResumeError, match=r"model\.rl\.reward is no key"):
        check_listed_keys(["model.rl.reward"], {"model": {"rl": {"rewards": ["accuracy"]}}})


def test_a_changed_reward_continues_after_a_stop_when_listed_and_is_recorded(tmp_path):
    first = run_tiny(tmp_path, *STEPS, "--model.rl.steps=2", "--trainer.max_steps=3")  # stopped in RL
    run = Path(first.trainer.default_root_dir)
    fixed = ["--model.rl.reward_weights=[1.0, 0.5]"]
    with pytest.raises(ResumeError, match=r"model\.rl\.reward_weights\[1\]: 0\.2 in the run, 0\.5"):
        run_tiny(tmp_path, *STEPS, "--model.rl.steps=2", *fixed, "--ckpt_path=last")
    resumed = run_tiny(tmp_path, *STEPS, "--model.rl.steps=2", *fixed, "--ckpt_path=last",
                       "--resume_may_differ=[model.rl.reward_weights]")  # fmt: skip
    assert Path(resumed.trainer.default_root_dir) == run and resumed.model.steps_done == 4
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["rl"]["reward_weights"] == [1.0, 0.5]
    (entry,) = saved["resumed_with_changes"]
    assert entry["changes"] == {"model.rl.reward_weights[1]": {"old": 0.2, "new": 0.5}} and entry["steps_done"] == 3
    again = run_tiny(tmp_path, *STEPS, "--model.rl.steps=2", *fixed, "--ckpt_path=last")  # the new config matches
    assert Path(again.trainer.default_root_dir) == run


# ------------------------------------------------------------------------------- --ckpt_path <file>
def test_ckpt_path_file_with_other_settings_is_refused_naming_the_keys(extended):
    run = extended[0]
    with pytest.raises(ResumeError, match=r"model\.sft\.steps: 2 in the checkpoint, 8 in this command"):
        run_tiny(run.parent / "other", *STEPS, "--model.rl.steps=4", "--model.sft.steps=8",
                 f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")  # fmt: skip


def test_checkpoint_hyperparameters_never_choose_an_import(extended, tmp_path):
    run = extended[0]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["rl"]["rewards"] = ["corrpo_crafted_module:reward"]
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    with pytest.raises(ResumeError, match=r"model\.rl\.rewards\[0\]: 'corrpo_crafted_module:reward' in the checkpoint"):
        run_tiny(tmp_path, "--config", str(run / "config.yaml"), f"--ckpt_path={crafted}", subcommand="validate")
    assert "corrpo_crafted_module" not in sys.modules


def test_checkpoint_differences_compare_only_what_the_checkpoint_saved():
    assert checkpoint_differences({"sft": {"steps": 2}}, {"sft": {"steps": 3}, "generator": None}) == [
        ("model.sft.steps", 2, 3)
    ]


# ------------------------------------------------------------------------- tools never write into a run
def _tree(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (wandb's debug-core.log is a link to a log all wandb processes share:
    not the run's file)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_on_a_runs_config_write_nothing_into_it_and_print_their_result(extended, subcommand, capsys):
    run = extended[0]
    before = _tree(run)
    cli = run_tiny(run, "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                   subcommand=subcommand)  # fmt: skip
    assert _tree(run) == before  # not one byte: config.yaml, wandb, checkpoints
    own = Path(cli.trainer.default_root_dir)
    assert own.parent == run.parent and own != run and (own / "config.yaml").is_file()
    key = "val/accuracy" if subcommand == "validate" else "test/accuracy"
    assert key in capsys.readouterr().out and key in cli.trainer.callback_metrics


def test_a_new_run_from_a_runs_config_gets_a_folder_beside_it(extended):
    run = extended[0]
    before = _tree(run)
    cli = run_tiny(run, "--config", str(run / "config.yaml"), "--model.rl.steps=1")  # no --ckpt_path: a new run
    own = Path(cli.trainer.default_root_dir)
    assert own.parent == run.parent and _tree(run) == before
    assert (own / "checkpoints" / "last.ckpt").is_file() and list((own / "wandb").glob("*run-*"))
    assert yaml.safe_load((own / "config.yaml").read_text())["resumed_with_changes"] is None


# --------------------------------------------------------------------------- a broken run never blocks
def test_a_corrupt_config_yaml_in_the_newest_run_does_not_block_resuming_an_older_one(tmp_path):
    older, newer = tmp_path / "20250101-000000", tmp_path / "20250102-000000"
    config = {"model": {"rl": {"steps": 2}}}
    for run in (older, newer):
        (run / "checkpoints").mkdir(parents=True)
        torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    (older / "config.yaml").write_text(yaml.safe_dump(config))
    (newer / "config.yaml").write_text("model:\n  rl: {steps: 2\n")  # truncated by a crash
    with pytest.warns(UserWarning, match=r"not resuming .*20250102-000000.*config\.yaml:\d+ is not valid YAML"):
        assert resume_point(tmp_path, config) == (older, older / "checkpoints" / "last.ckpt")


def test_a_config_yaml_cut_short_but_still_parsing_is_not_taken_for_the_runs_config(tmp_path):
    run = tmp_path / "20250101-000000"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("# lightning.pytorch==2.6.6\nmodel:\n  rl:\n    steps: 2\n")  # the rest is lost
    with pytest.raises(ResumeError, match=r"config\.yaml is cut short"):
        resume_point(tmp_path, {"model": {"rl": {"steps": 2}}, "data": {"seed": 1}})
