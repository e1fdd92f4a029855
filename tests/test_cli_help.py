"""``--help`` explains every key; choices are Literal (listed, refused at parse time); every subcommand says what it
does; Lightning options that manual optimisation cannot honour are refused up front, naming what to set instead."""

import argparse
from pathlib import Path
from unittest import mock

import pytest
from lightning.pytorch.cli import LightningCLI

from corrpo.cli import SUBCOMMANDS, build_cli

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


class _Built(Exception):
    pass


@pytest.fixture(scope="module")
def subcommand_parsers() -> dict:
    """The parsers LightningCLI builds, caught before it parses anything."""
    box = {}

    def grab(cli, parser, args):
        box["cli"] = cli
        raise _Built

    with mock.patch.object(LightningCLI, "parse_arguments", grab), pytest.raises(_Built):
        build_cli(["fit"])
    return box["cli"]._subcommand_parsers


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_every_key_has_help_text(subcommand_parsers, subcommand):
    actions = [a for a in subcommand_parsers[subcommand]._actions if a.help != argparse.SUPPRESS]
    assert len(actions) > 100
    bare = [a.dest for a in actions if not (a.help or "").strip()]
    assert bare == [], f"keys without help: {bare}"


def test_choices_are_listed_in_help(subcommand_parsers):
    text = subcommand_parsers["fit"].format_help()
    assert "--model.rl.loss_type {grpo,dr_grpo,dapo,bnpo}" in text
    assert "--model.rl.policy_loss {clip,clip_cov,kl_cov}" in text
    assert "Batches of this phase" in text  # an attribute docstring, as help
    assert "--optimizer" not in text and "--lr_scheduler" not in text


@pytest.mark.parametrize("override", ["--model.rl.loss_type=foo", "--model.rl.scale_rewards=foo"])
def test_a_bad_choice_fails_at_parse_time(override, capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", TINY, override, "--print_config"])
    err = capsys.readouterr().err
    assert override.split("=")[0].removeprefix("--") in err and "foo" in err


def test_corrpo_help_lists_every_subcommand_and_validate_says_it_fingerprints(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--help"])
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "report"):
        assert name in text and SUBCOMMANDS[name][:40] in " ".join(text.split())
    with pytest.raises(SystemExit):
        build_cli(["validate", "--help"])
    assert "Fingerprint a checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--optimizer=SGD"], "model.rl.lr"),
        (["--lr_scheduler", "StepLR"], "warmup_steps"),
        (["--trainer.gradient_clip_val=1.0"], "max_grad_norm"),
    ],
)
def test_options_manual_optimisation_cannot_honour_are_refused(args, named, tmp_path):
    with pytest.raises(SystemExit, match=named):
        build_cli(["fit", "--config", TINY, *args, f"--trainer.default_root_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_gradient_clipping_set_in_a_config_is_refused_too(tmp_path):
    config = tmp_path / "clip.yaml"
    config.write_text("trainer:\n  gradient_clip_val: 0.5\n")
    root = tmp_path / "runs"
    with pytest.raises(SystemExit, match="max_grad_norm"):
        build_cli(["fit", "--config", TINY, "--config", str(config), f"--trainer.default_root_dir={root}"])
    assert not root.exists() or not any(root.iterdir())
