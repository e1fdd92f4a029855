"""Settings that used to train nothing without a word: each is now an error naming the key, or a counted warning."""

import pytest
from conftest import REPO

from corrpo.cli import build_cli
from corrpo.models.batching import encode_prompts, encode_sft_batch
from corrpo.models.loading import load_policy
from corrpo.training.config import RLConfig

TINY_YAML = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    return load_policy("tiny-qwen2")[1]


def test_one_generation_per_prompt_with_rl_steps_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"rl\.num_generations=1 with rl\.steps=5: .*advantages .* all 0"):
        RLConfig(steps=5, num_generations=1)
    assert RLConfig(steps=0, num_generations=1).num_generations == 1  # an SFT-only run never groups


@pytest.mark.parametrize("length", [-5, 0])
def test_a_non_positive_max_prompt_length_is_an_error_naming_the_key(length, tokenizer):
    with pytest.raises(ValueError, match=rf"rl\.max_prompt_length must be None .* or > 0, got {length}"):
        RLConfig(max_prompt_length=length)
    with pytest.raises(ValueError, match=r"rl\.max_prompt_length"):
        encode_prompts(tokenizer, ["1+2="], max_prompt_length=length)


def test_sft_rows_whose_prompt_fills_max_length_are_warned_with_their_count(tokenizer):
    prompts, completions = ["1+1=" * 10, "2+2=", "3+3=" * 10], ["2", "4", "6"]
    with pytest.warns(UserWarning, match=r"sft\.max_length=16: 2 of 3 SFT rows have prompts of >= 16 tokens"):
        enc = encode_sft_batch(tokenizer, prompts, completions, max_length=16)
    assert enc["loss_mask"][:, 1:].sum(dim=1).tolist()[0] == 0 and enc["loss_mask"][1, 1:].sum() > 0


def test_an_sft_batch_in_which_no_row_has_a_loss_token_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"sft\.max_length=8: all 2 of 2 SFT rows .*\(0 loss tokens\)"):
        encode_sft_batch(tokenizer, ["1+1=" * 4, "2+2=" * 4], ["2", "4"], max_length=8)


@pytest.mark.parametrize("key", ["--model.eval_batch_size=0", "--data.eval_batch_size=0"])
def test_a_zero_eval_batch_size_is_an_error_naming_the_key_before_training(key, tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        build_cli(["fit", "--config", TINY_YAML, key, f"--trainer.default_root_dir={tmp_path}"])
    assert key.split("=")[0].lstrip("-") in str(info.value) + capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("config.yaml"))


def test_fit_without_a_config_trains_zero_steps_and_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"both phases have 0 steps .*--config configs/tiny\.yaml"):
        build_cli(["fit", f"--trainer.default_root_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # refused before a run folder was made
