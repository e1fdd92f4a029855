"""``seed_everything`` seeds the model's initial weights, the data order and the embedded task where their own seeds
(``model.seed``, ``data.seed``, ``data.arithmetic.seed``) are unset; a seed set explicitly wins."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY_FAST_ARGS
from jsonargparse import Namespace

from corrpo.cli import build_cli, fill_unset_seeds


@pytest.fixture(autouse=True)
def global_seed_restored(monkeypatch):
    """Lightning's seed_everything sets PL_GLOBAL_SEED in this process: put back what the other tests see."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


def built(root, *extra):
    """The CLI's model and data module for tiny.yaml shrunk (nothing trained)."""
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), *TINY_FAST_ARGS, "--trainer.logger=false",
            f"--trainer.default_root_dir={root}", *extra]  # fmt: skip
    return build_cli(args, run=False)


def weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in cli.model.policy.state_dict().items()}


def first_prompts(cli) -> list[str]:
    return cli.datamodule.step_batches()[0]["prompt"]


def test_seed_everything_alone_changes_the_weights_the_data_order_and_the_task(tmp_path):
    zero, one = built(tmp_path, "--seed_everything=0"), built(tmp_path, "--seed_everything=1")
    assert (zero.model.seed, zero.datamodule.seed, zero.datamodule.arithmetic.seed) == (0, 0, 0)
    assert (one.model.seed, one.datamodule.seed, one.datamodule.arithmetic.seed) == (1, 1, 1)
    a, b = weights(zero), weights(one)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert first_prompts(zero) != first_prompts(one)
    assert zero.datamodule.test_records() != one.datamodule.test_records()  # the task draws other problems
    assert one.config.model.seed == 1 and one.config.data.arithmetic.seed == 1  # config.yaml records them


def test_an_explicit_seed_wins_over_seed_everything(tmp_path):
    zero = built(tmp_path, "--seed_everything=0")
    pinned = built(tmp_path, "--seed_everything=1", "--model.seed=0", "--data.seed=0", "--data.arithmetic.seed=0")
    a, b = weights(zero), weights(pinned)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first_prompts(zero) == first_prompts(pinned)
    assert pinned.config.seed_everything == 1 and pinned.model.seed == 0


def test_unset_seeds_take_seed_everything_or_0_when_it_is_off():
    config = Namespace(seed_everything=7)
    config["model.seed"], config["data.seed"], config["data.arithmetic.seed"] = None, 3, None
    fill_unset_seeds(config)
    assert (config["model.seed"], config["data.seed"], config["data.arithmetic.seed"]) == (7, 3, 7)
    off = Namespace(seed_everything=False)
    off["model.seed"] = None
    fill_unset_seeds(off)
    assert off["model.seed"] == 0
