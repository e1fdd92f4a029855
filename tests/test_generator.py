"""The rollout engine is an interface: a scripted engine drives a real run; vLLM fails clearly when missing."""

import csv
import importlib.util

import pytest
import torch
from conftest import REPO, run_tiny
from fake_generators import ScriptedGenerator, solve

from corrpo.cli import build_cli
from corrpo.generation.rollout import rollout_from_sequences, rollout_from_token_lists
from corrpo.models.batching import completion_mask

EOS, PAD = 2, 0


def test_token_lists_make_the_same_rollout_as_padded_sequences():
    prompt_ids = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    prompt_mask = (prompt_ids != PAD).long()
    completions = [[11, 12, EOS], [13, EOS, 14, 15], [16, 17, 18, 19], [EOS]]  # G = 2
    rollout = rollout_from_token_lists(prompt_ids, prompt_mask, completions, 2, EOS, PAD, max_new_tokens=4)
    padded = torch.tensor([[11, 12, EOS, PAD], [13, EOS, PAD, PAD], [16, 17, 18, 19], [EOS, PAD, PAD, PAD]])
    reference = rollout_from_sequences(
        torch.cat([prompt_ids.repeat_interleave(2, 0), padded], 1), prompt_mask.repeat_interleave(2, 0), EOS, PAD
    )
    for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
        assert torch.equal(getattr(rollout, field), getattr(reference, field)), field
    assert rollout.truncated.tolist() == [False, False, True, False]
    mask, _ = completion_mask(rollout.completion_ids, EOS)
    assert torch.equal(mask, rollout.completion_mask)


def test_an_empty_completion_from_an_engine_has_an_empty_mask():
    prompt_ids = torch.tensor([[5, 6]])
    rollout = rollout_from_token_lists(prompt_ids, torch.ones_like(prompt_ids), [[], [7, EOS]], 2, EOS, PAD, 8)
    assert rollout.completion_mask.tolist() == [[False, False], [True, True]]
    assert rollout.truncated.tolist() == [False, False]
    with pytest.raises(ValueError, match="3 completions for 1 prompts x G=2"):
        rollout_from_token_lists(prompt_ids, torch.ones_like(prompt_ids), [[1], [2], [3]], 2, EOS, PAD, 8)


def test_the_arithmetic_solver_of_the_scripted_engine_is_right():
    from corrpo.data.arithmetic import ArithmeticTask

    for record in ArithmeticTask().records("train", 50):
        assert str(solve(record["prompt"])) == record["answer"]


def test_a_scripted_engine_drives_rollouts_and_evaluation_and_is_synced_after_every_update(tmp_path):
    csv_logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s"}}' % (
        tmp_path / "csv"
    )
    cli = run_tiny(
        tmp_path,
        "--model.generator=fake_generators.ScriptedGenerator",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger+={csv_logger}",
    )
    module, engine = cli.model, cli.model.generator
    assert isinstance(engine, ScriptedGenerator)
    # greedy evaluation answers right: the module scored the engine's completions, not its own generate
    assert [e["accuracy"] for e in module.eval_history] == [1.0, 1.0, 1.0]
    # RL: half of each group right, so accuracy is 0.5 and every group has reward variance
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("rl/rewards/accuracy/mean")]
    assert len(rows) == 3 and all(float(r["rl/rewards/accuracy/mean"]) == 0.5 for r in rows)
    assert all(float(r["rl/frac_reward_zero_std"]) == 0.0 for r in rows)
    # 3 evaluations + 3 RL steps; every generation after an update ran on the current weights
    assert engine.calls == 6 and engine.stale_calls == 0
    assert engine.syncs == 4  # before sft_end eval, RL steps 2 and 3, and the end eval (RL step 1 follows sft_end)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_generator_without_vllm_names_the_extra_before_training(tmp_path, capsys):
    from corrpo.generation.vllm import VLLMGenerator

    with pytest.raises(ImportError, match=r'pip install "corrpo\[vllm\]"'):
        VLLMGenerator()
    with pytest.raises((SystemExit, ImportError, ValueError)) as info:
        build_cli(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
                   "--model.generator=corrpo.generation.vllm.VLLMGenerator"])  # fmt: skip
    assert "corrpo[vllm]" in str(info.value) + capsys.readouterr().err
    assert not list(tmp_path.rglob("emergence.csv"))
